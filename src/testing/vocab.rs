//! The tiny vocabularies of the test models, as GGUF tokenizer metadata: a byte-level BPE one
//! (SmolLM2's style: three ChatML specials, the 256 byte symbols, a few merges) and a
//! SentencePiece one (Gemma's style: control tokens, the 256 `<0xXX>` byte pieces, a few
//! scored pieces with `▁` for spaces).

use candle_core::quantized::gguf_file::Value as V;

/// GPT-2's byte-to-character map used by byte-level BPE vocabularies.
pub fn bytes_to_unicode() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut map = vec![' '; 256];
    for (b, c) in bs.into_iter().zip(cs) {
        map[b as usize] = char::from_u32(c).unwrap_or('?');
    }
    map
}

/// The BPE vocabulary: three special tokens, the 256 byte symbols, and a few merges.
pub fn tiny_vocab() -> (Vec<String>, Vec<i32>, Vec<String>) {
    let mut tokens: Vec<String> = vec![
        "<|endoftext|>".into(),
        "<|im_start|>".into(),
        "<|im_end|>".into(),
    ];
    let mut types = vec![3, 3, 3];
    for c in bytes_to_unicode() {
        tokens.push(c.to_string());
        types.push(1);
    }
    let merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r"];
    for m in merges {
        tokens.push(m.replace(' ', ""));
        types.push(1);
    }
    (
        tokens,
        types,
        merges.iter().map(|s| s.to_string()).collect(),
    )
}

/// GGUF metadata of the BPE vocabulary (`tokenizer.ggml.model = gpt2`, SmolLM2's rules).
pub fn bpe_metadata() -> Vec<(String, V)> {
    let (tokens, types, merges) = tiny_vocab();
    vec![
        ("tokenizer.ggml.model".into(), V::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), V::String("smollm".into())),
        (
            "tokenizer.ggml.tokens".into(),
            V::Array(tokens.into_iter().map(V::String).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            V::Array(types.into_iter().map(V::I32).collect()),
        ),
        (
            "tokenizer.ggml.merges".into(),
            V::Array(merges.into_iter().map(V::String).collect()),
        ),
        ("tokenizer.ggml.bos_token_id".into(), V::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), V::U32(2)),
        ("tokenizer.ggml.add_bos_token".into(), V::Bool(false)),
    ]
}

/// The SentencePiece vocabulary: pieces, scores and token types.
pub fn tiny_spm_vocab() -> (Vec<String>, Vec<f32>, Vec<i32>) {
    let mut pieces: Vec<String> = ["<pad>", "<eos>", "<bos>", "<unk>"]
        .into_iter()
        .chain(["<start_of_turn>", "<end_of_turn>"])
        .map(String::from)
        .collect();
    let mut types = vec![3, 3, 3, 2, 3, 3];
    for b in 0..=255u8 {
        pieces.push(format!("<0x{b:02X}>"));
        types.push(6);
    }
    let normal: Vec<String> = ["\u{2581}"]
        .into_iter()
        .map(String::from)
        .chain(('a'..='z').map(String::from))
        .chain(
            [
                "th",
                "he",
                "in",
                "er",
                "an",
                "\u{2581}t",
                "\u{2581}a",
                "\u{2581}the",
                "the",
                "\u{2581}in",
                "\u{2581}is",
                "is",
                "on",
                "at",
                "en",
            ]
            .map(String::from),
        )
        .collect();
    let mut scores = vec![0.0; pieces.len()];
    for (i, p) in normal.into_iter().enumerate() {
        pieces.push(p);
        types.push(1);
        scores.push(-(i as f32));
    }
    (pieces, scores, types)
}

/// GGUF metadata of the SentencePiece vocabulary (`tokenizer.ggml.model = llama`, Gemma's
/// settings: BOS 2 added, EOS 1, no space prefix).
pub fn spm_metadata() -> Vec<(String, V)> {
    let (pieces, scores, types) = tiny_spm_vocab();
    vec![
        ("tokenizer.ggml.model".into(), V::String("llama".into())),
        ("tokenizer.ggml.pre".into(), V::String("default".into())),
        (
            "tokenizer.ggml.tokens".into(),
            V::Array(pieces.into_iter().map(V::String).collect()),
        ),
        (
            "tokenizer.ggml.scores".into(),
            V::Array(scores.into_iter().map(V::F32).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            V::Array(types.into_iter().map(V::I32).collect()),
        ),
        ("tokenizer.ggml.bos_token_id".into(), V::U32(2)),
        ("tokenizer.ggml.eos_token_id".into(), V::U32(1)),
        ("tokenizer.ggml.unknown_token_id".into(), V::U32(3)),
        ("tokenizer.ggml.padding_token_id".into(), V::U32(0)),
        ("tokenizer.ggml.add_bos_token".into(), V::Bool(true)),
        ("tokenizer.ggml.add_space_prefix".into(), V::Bool(false)),
    ]
}
