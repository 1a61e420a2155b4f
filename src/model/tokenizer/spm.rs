//! SentencePiece tokenization as llama.cpp performs it for GGUF files whose
//! `tokenizer.ggml.model` is `llama` (Llama 2, Gemma): the vocabulary's pieces with their
//! scores, no merges list (Kudo & Richardson 2018, <https://arxiv.org/abs/1808.06226>).
//!
//! Encoding, step by step as in llama.cpp's `llm_tokenizer_spm`:
//! 1. special-token text (control, user-defined and unknown pieces) is split out of the
//!    input first, longest piece first, and becomes those tokens;
//! 2. each remaining fragment gets a leading space if the file says
//!    `add_space_prefix` and the fragment follows a special token or starts the text, then
//!    every space becomes `▁` (U+2581);
//! 3. the fragment starts as one symbol per character; the adjacent pair whose concatenation
//!    is a piece with the highest score is merged (ties: leftmost), until no pair is a piece;
//! 4. a symbol that is not a piece becomes its UTF-8 bytes as `<0xXX>` byte tokens.
//!
//! Decoding reverses 2 and 4: `▁` becomes a space, byte tokens become bytes, control tokens
//! are left out.

use aho_corasick::AhoCorasick;
use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

/// GGUF `tokenizer.ggml.token_type` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenType {
    pub fn from_gguf(t: i32) -> Self {
        match t {
            2 => TokenType::Unknown,
            3 => TokenType::Control,
            4 => TokenType::UserDefined,
            5 => TokenType::Unused,
            6 => TokenType::Byte,
            _ => TokenType::Normal,
        }
    }

    /// Split out of raw text before tokenizing (llama.cpp's special-token cache).
    fn is_special(self) -> bool {
        matches!(
            self,
            TokenType::Control | TokenType::UserDefined | TokenType::Unknown
        )
    }
}

/// A SentencePiece vocabulary with llama.cpp's encoding rules.
#[derive(Debug, Clone)]
pub struct SpmTokenizer {
    pieces: Vec<String>,
    scores: Vec<f32>,
    types: Vec<TokenType>,
    ids: HashMap<String, u32>,
    /// Special tokens, longest text first.
    specials: Vec<u32>,
    /// Finds every special token in a text in one pass (pattern `i` is `specials[i]`).
    special_finder: Option<AhoCorasick>,
    /// `byte_tokens[b]`: the id of `<0xBB>`.
    byte_tokens: [Option<u32>; 256],
    unknown: Option<u32>,
    add_space_prefix: bool,
}

/// A piece of input: text still to tokenize, or a special token already found.
enum Fragment<'a> {
    Text(&'a str),
    Token(u32),
}

impl SpmTokenizer {
    pub fn new(
        pieces: Vec<String>,
        scores: Vec<f32>,
        types: Vec<TokenType>,
        unknown: Option<u32>,
        add_space_prefix: bool,
    ) -> Result<Self, String> {
        if scores.len() != pieces.len() || types.len() != pieces.len() {
            return Err(format!(
                "{} pieces, {} scores and {} token types",
                pieces.len(),
                scores.len(),
                types.len()
            ));
        }
        let mut ids = HashMap::with_capacity(pieces.len());
        for (i, p) in pieces.iter().enumerate() {
            // A later duplicate wins, as in llama.cpp's `token_to_id`.
            ids.insert(p.clone(), i as u32);
        }
        let mut specials: Vec<u32> = (0..pieces.len() as u32)
            .filter(|&i| types[i as usize].is_special() && !pieces[i as usize].is_empty())
            .collect();
        specials.sort_by(|a, b| pieces[*b as usize].len().cmp(&pieces[*a as usize].len()));
        let special_finder = (!specials.is_empty())
            .then(|| AhoCorasick::new(specials.iter().map(|&i| &pieces[i as usize])))
            .transpose()
            .map_err(|e| format!("indexing the special tokens: {e}"))?;
        let mut byte_tokens = [None; 256];
        for (b, slot) in byte_tokens.iter_mut().enumerate() {
            *slot = ids.get(&format!("<0x{b:02X}>")).copied();
        }
        Ok(Self {
            pieces,
            scores,
            types,
            ids,
            specials,
            special_finder,
            byte_tokens,
            unknown,
            add_space_prefix,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.pieces.len()
    }

    pub fn piece(&self, id: u32) -> Option<&str> {
        self.pieces.get(id as usize).map(String::as_str)
    }

    pub fn token_to_id(&self, piece: &str) -> Option<u32> {
        self.ids.get(piece).copied()
    }

    pub fn token_type(&self, id: u32) -> Option<TokenType> {
        self.types.get(id as usize).copied()
    }

    /// Token ids of `text`, special-token text included as those tokens.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        let mut prev_special = true;
        for fragment in self.partition(text) {
            match fragment {
                Fragment::Token(id) => {
                    out.push(id);
                    prev_special = true;
                }
                Fragment::Text(t) => {
                    let mut s = String::with_capacity(t.len() + 3);
                    if self.add_space_prefix && prev_special {
                        s.push(' ');
                    }
                    s.push_str(t);
                    self.encode_fragment(&s.replace(' ', "\u{2581}"), &mut out);
                    prev_special = false;
                }
            }
        }
        out
    }

    /// Splits special-token text out of `text`, one special token at a time, longest first
    /// (llama.cpp's order). Only the special tokens the text holds are tried: one pass over
    /// the text finds them, so a vocabulary with thousands of control tokens costs nothing
    /// on text that has none.
    fn partition<'a>(&self, text: &'a str) -> Vec<Fragment<'a>> {
        let mut fragments = vec![Fragment::Text(text)];
        if text.is_empty() {
            return Vec::new();
        }
        let Some(finder) = &self.special_finder else {
            return fragments;
        };
        let mut present = vec![false; self.specials.len()];
        for m in finder.find_overlapping_iter(text) {
            present[m.pattern().as_usize()] = true;
        }
        for (k, &id) in self.specials.iter().enumerate() {
            if !present[k] {
                continue;
            }
            let piece = self.pieces[id as usize].as_str();
            let mut next = Vec::with_capacity(fragments.len() + 2);
            for f in fragments {
                let Fragment::Text(mut rest) = f else {
                    next.push(f);
                    continue;
                };
                while let Some(at) = rest.find(piece) {
                    if at > 0 {
                        next.push(Fragment::Text(&rest[..at]));
                    }
                    next.push(Fragment::Token(id));
                    rest = &rest[at + piece.len()..];
                }
                if !rest.is_empty() {
                    next.push(Fragment::Text(rest));
                }
            }
            fragments = next;
        }
        fragments
    }

    /// The bigram merges of step 3 and the byte fallback of step 4 on one escaped fragment.
    fn encode_fragment(&self, text: &str, out: &mut Vec<u32>) {
        // Symbols: byte ranges into `text`, linked as a list so merges are O(1).
        struct Symbol {
            start: usize,
            len: usize,
            prev: Option<usize>,
            next: Option<usize>,
        }
        let mut symbols: Vec<Symbol> = Vec::new();
        for (start, ch) in text.char_indices() {
            let i = symbols.len();
            symbols.push(Symbol {
                start,
                len: ch.len_utf8(),
                prev: i.checked_sub(1),
                next: None,
            });
            if i > 0 {
                symbols[i - 1].next = Some(i);
            }
        }
        let mut queue = BinaryHeap::new();
        let bigram = |symbols: &[Symbol], left: usize, right: usize| -> Option<Bigram> {
            let (l, r) = (&symbols[left], &symbols[right]);
            let merged = &text[l.start..r.start + r.len];
            let id = *self.ids.get(merged)?;
            Some(Bigram {
                score: self.scores[id as usize],
                left,
                right,
                size: merged.len(),
            })
        };
        for i in 1..symbols.len() {
            queue.extend(bigram(&symbols, i - 1, i));
        }
        while let Some(b) = queue.pop() {
            let (l, r) = (&symbols[b.left], &symbols[b.right]);
            // Skip pairs whose symbols changed since the pair was queued.
            if l.len == 0 || r.len == 0 || l.len + r.len != b.size {
                continue;
            }
            let right_next = r.next;
            symbols[b.left].len += symbols[b.right].len;
            symbols[b.right].len = 0;
            symbols[b.left].next = right_next;
            if let Some(n) = right_next {
                symbols[n].prev = Some(b.left);
            }
            if let Some(p) = symbols[b.left].prev {
                queue.extend(bigram(&symbols, p, b.left));
            }
            if let Some(n) = right_next {
                queue.extend(bigram(&symbols, b.left, n));
            }
        }
        let mut at = (!symbols.is_empty()).then_some(0);
        while let Some(i) = at {
            let s = &symbols[i];
            let piece = &text[s.start..s.start + s.len];
            match self.ids.get(piece) {
                Some(&id) => out.push(id),
                None => {
                    for b in piece.bytes() {
                        if let Some(id) = self.byte_tokens[b as usize].or(self.unknown) {
                            out.push(id);
                        }
                    }
                }
            }
            at = s.next;
        }
    }

    /// The text of `ids`. Control and unknown tokens are left out unless `special`; a byte
    /// token adds its byte, so pieces of one character spread over several tokens join up.
    pub fn decode(&self, ids: &[u32], special: bool) -> String {
        let mut bytes = Vec::new();
        let mut remove_space = self.add_space_prefix;
        for &id in ids {
            self.piece_bytes(id, special, &mut bytes, remove_space);
            remove_space = false;
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// One token's text as the model sees it: special tokens as their text, `▁` as a space,
    /// a byte token as its byte (lossy if it is part of a longer character).
    pub fn token_text(&self, id: u32) -> String {
        let mut bytes = Vec::new();
        self.piece_bytes(id, true, &mut bytes, false);
        String::from_utf8_lossy(&bytes).into_owned()
    }

    fn piece_bytes(&self, id: u32, special: bool, out: &mut Vec<u8>, strip_space: bool) {
        let (Some(piece), Some(ty)) = (self.piece(id), self.token_type(id)) else {
            return;
        };
        let start = out.len();
        match ty {
            TokenType::Control | TokenType::Unknown => {
                if special {
                    out.extend_from_slice(piece.as_bytes());
                }
            }
            TokenType::UserDefined => out.extend_from_slice(piece.as_bytes()),
            TokenType::Byte => {
                if let Some(b) = piece
                    .strip_prefix("<0x")
                    .and_then(|h| h.strip_suffix('>'))
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    out.push(b);
                }
            }
            TokenType::Normal => out.extend_from_slice(piece.replace('\u{2581}', " ").as_bytes()),
            // llama.cpp prints nothing for unused pieces.
            TokenType::Unused => {}
        }
        if strip_space && out.get(start) == Some(&b' ') {
            out.remove(start);
        }
    }
}

/// A candidate merge of two adjacent symbols.
#[derive(Debug, PartialEq)]
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    size: usize,
}

impl Eq for Bigram {}

impl Ord for Bigram {
    /// Highest score first; among equal scores, the leftmost pair.
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A vocabulary where "ab" outscores "bc", so "abc" merges as "ab" + "c".
    fn tiny() -> SpmTokenizer {
        let mut pieces: Vec<String> = vec!["<unk>".into(), "<s>".into(), "<eot>".into()];
        let mut types = vec![TokenType::Unknown, TokenType::Control, TokenType::Control];
        let mut scores = vec![0.0, 0.0, 0.0];
        for b in 0..=255u8 {
            pieces.push(format!("<0x{b:02X}>"));
            types.push(TokenType::Byte);
            scores.push(0.0);
        }
        for (p, s) in [
            ("a", -1.0),
            ("b", -1.0),
            ("c", -1.0),
            ("\u{2581}", -1.0),
            ("ab", -2.0),
            ("bc", -3.0),
            ("\u{2581}a", -2.5),
            ("abc", -4.0),
            ("\n\n", 0.0),
        ] {
            pieces.push(p.into());
            types.push(if p == "\n\n" {
                TokenType::UserDefined
            } else {
                TokenType::Normal
            });
            scores.push(s);
        }
        SpmTokenizer::new(pieces, scores, types, Some(0), false).unwrap()
    }

    fn ids(t: &SpmTokenizer, pieces: &[&str]) -> Vec<u32> {
        pieces.iter().map(|p| t.token_to_id(p).unwrap()).collect()
    }

    #[test]
    fn merges_follow_scores_and_unknown_characters_fall_back_to_bytes() {
        let t = tiny();
        // "ab" (-2) beats "bc" (-3); then "abc" (-4) joins "ab" and "c".
        assert_eq!(t.encode("abc"), ids(&t, &["abc"]));
        assert_eq!(t.encode("bca"), ids(&t, &["bc", "a"]));
        // Spaces are ▁; "▁a" merges.
        assert_eq!(t.encode(" a b"), ids(&t, &["\u{2581}a", "\u{2581}", "b"]));
        // "é" is not a piece: its two UTF-8 bytes.
        assert_eq!(t.encode("é"), ids(&t, &["<0xC3>", "<0xA9>"]));
        assert_eq!(t.decode(&t.encode("é a"), false), "é a");
    }

    #[test]
    fn special_text_is_split_out_and_control_tokens_decode_only_on_request() {
        let t = tiny();
        let got = t.encode("a<eot>b\n\nc");
        assert_eq!(got, ids(&t, &["a", "<eot>", "b", "\n\n", "c"]));
        assert_eq!(t.decode(&got, false), "ab\n\nc");
        assert_eq!(t.decode(&got, true), "a<eot>b\n\nc");
        assert!(t.encode("").is_empty());
    }

    #[test]
    fn a_space_prefix_is_added_after_special_tokens_and_removed_when_decoding() {
        let mut t = tiny();
        t.add_space_prefix = true;
        assert_eq!(t.encode("a"), ids(&t, &["\u{2581}a"]));
        assert_eq!(t.encode("<s>a"), ids(&t, &["<s>", "\u{2581}a"]));
        assert_eq!(t.decode(&t.encode("a b"), false), "a b");
    }
}
