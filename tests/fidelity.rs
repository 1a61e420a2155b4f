//! Fidelity on real weights, for every model tiller knows by name: the tokenizer gives
//! llama.cpp's ids on 200+ strings (and decodes them to llama.cpp's text); teacher-forced on
//! llama.cpp's greedy continuations, tiller predicts the same next token at least 95% of the
//! time, unsteered and with the same control vector added; next-token logits stay close to
//! candle-transformers' own quantized implementations, an independent oracle in Rust.
//!
//! SmolLM2 and Gemma 3 are fetched on first use (CI has both); the Qwen2.5 tests run when
//! its file is in `data/models` (`tiller fetch-model qwen2.5-coder-0.5b-instruct`).

mod common;

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use serde_json::Value;
use std::path::{Path, PathBuf};
use tiller::engine::sampling::argmax;
use tiller::model::hooks::{Hooks, NoHooks};
use tiller::model::{LoadOptions, Logits, Model};
use tiller::steering::intervention::BatchSteering;
use tiller::steering::spec::{validate, InterventionSpec, ModelLimits};
use tiller::steering::store::{ModelShape, VectorStore};

/// The least fraction of next tokens that must agree with llama.cpp's.
const MIN_AGREEMENT: f64 = 0.95;
/// Where tiller and llama.cpp pick different next tokens, the two top tokens must be within
/// this many nats of each other in at least one of them: a near tie that 8-bit activations
/// (llama.cpp) and 16-bit ones (tiller) may break differently.
const NEAR_TIE: f32 = 0.3;

/// The model's file: fetched for `fetch`, else only when already cached.
fn model_path(name: &str, fetch: bool) -> Option<PathBuf> {
    let cfg = tiller::config::Config::default();
    let m = tiller::model::catalogue::find(name).expect("a catalogue name");
    if fetch {
        Some(
            m.ensure(&cfg.model.cache_dir, &cfg.model.python)
                .unwrap_or_else(|e| panic!("{name} is needed for this test: {e:#}")),
        )
    } else {
        let p = m.cached(&cfg.model.cache_dir);
        if p.is_none() {
            eprintln!(
                "skipped: {name} is not in {} (tiller fetch-model {name})",
                cfg.model.cache_dir.display()
            );
        }
        p
    }
}

fn fixture(kind: &str, name: &str) -> Value {
    let path = format!("tests/fixtures/{kind}/{name}.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    serde_json::from_value(v.clone()).unwrap()
}

/// Every fixture string encodes to llama.cpp's ids and decodes to llama.cpp's text.
fn check_tokenizer(model: &Model, name: &str) {
    let f = fixture("tokenizer", name);
    let cases = f["cases"].as_array().unwrap();
    assert!(cases.len() >= 200, "{name}: only {} cases", cases.len());
    let mut wrong = Vec::new();
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let want = ids(&c["ids"]);
        let got = model.tokenizer.encode(text, false).unwrap();
        if got != want {
            wrong.push(format!("encode {text:?}: {got:?}, llama.cpp {want:?}"));
        }
        let decoded = model.tokenizer.decode(&want).unwrap();
        if decoded != c["decoded"].as_str().unwrap() {
            wrong.push(format!(
                "decode {want:?}: {decoded:?}, llama.cpp {}",
                c["decoded"]
            ));
        }
    }
    for chat in f["chats"].as_array().unwrap() {
        let messages: Vec<tiller::model::chat::ChatMessage> =
            serde_json::from_value(chat["messages"].clone()).unwrap();
        let rendered = model
            .chat_template
            .as_ref()
            .expect("a chat template")
            .render(&messages, true)
            .unwrap();
        assert_eq!(rendered, chat["text"].as_str().unwrap(), "{name}");
        assert_eq!(
            model.encode_chat(&messages).unwrap(),
            ids(&chat["ids"]),
            "{name}"
        );
    }
    assert!(wrong.is_empty(), "{name}:\n{}", wrong.join("\n"));
}

/// Teacher-forced on one fixture run: how many continuation tokens tiller predicts as
/// llama.cpp did, and the differences between tiller's and llama.cpp's log-probabilities of
/// llama.cpp's five most likely tokens at every step.
struct Agreement {
    agree: usize,
    total: usize,
    logprob_diffs: Vec<f32>,
    /// At each disagreement: llama.cpp's and tiller's margins between their two top tokens.
    near_ties: Vec<(f64, f32)>,
}

fn agreement(model: &Model, run: &Value, hooks: &mut dyn Hooks) -> Agreement {
    let prompt = ids(&run["prompt_ids"]);
    let cont = ids(&run["continuation"]);
    let tokens: Vec<u32> = prompt.iter().chain(&cont).copied().collect();
    let rows = model
        .run_fresh(&[&tokens], Logits::Every, usize::MAX, hooks)
        .unwrap()
        .remove(0);
    let mut a = Agreement {
        agree: 0,
        total: cont.len(),
        logprob_diffs: Vec::new(),
        near_ties: Vec::new(),
    };
    for (k, &t) in cont.iter().enumerate() {
        let logits = &rows[prompt.len() - 1 + k];
        let lp = tiller::engine::sampling::log_softmax(logits);
        if argmax(logits) == t {
            a.agree += 1;
        } else {
            let mut sorted = lp.clone();
            sorted.sort_by(|x, y| y.total_cmp(x));
            let theirs = run["margins"][k].as_f64().unwrap();
            a.near_ties.push((theirs, sorted[0] - sorted[1]));
        }
        for pair in run["top_logprobs"][k].as_array().unwrap() {
            let (id, theirs) = (
                pair[0].as_u64().unwrap() as usize,
                pair[1].as_f64().unwrap(),
            );
            a.logprob_diffs.push((lp[id] - theirs as f32).abs());
        }
    }
    a
}

/// Sums the agreement over runs, with `hooks_for(run)`.
fn total_agreement<'a>(
    model: &Model,
    runs: &'a [Value],
    mut hooks_for: impl FnMut(&'a Value) -> Box<dyn Hooks + 'a>,
) -> Agreement {
    let mut sum = Agreement {
        agree: 0,
        total: 0,
        logprob_diffs: Vec::new(),
        near_ties: Vec::new(),
    };
    for run in runs {
        let a = agreement(model, run, hooks_for(run).as_mut());
        sum.agree += a.agree;
        sum.total += a.total;
        sum.logprob_diffs.extend(a.logprob_diffs);
        sum.near_ties.extend(a.near_ties);
    }
    sum
}

impl Agreement {
    fn rate(&self) -> f64 {
        self.agree as f64 / self.total as f64
    }

    /// Every disagreement is a near tie.
    fn check_near_ties(&self, what: &str) {
        for &(theirs, ours) in &self.near_ties {
            assert!(
                (theirs as f32).min(ours) < NEAR_TIE,
                "{what}: tiller and llama.cpp disagree where both are sure (margins {theirs}, {ours})"
            );
        }
    }

    fn mean_logprob_diff(&self) -> f32 {
        self.logprob_diffs.iter().sum::<f32>() / self.logprob_diffs.len() as f32
    }
}

/// The fixture's control vector as a steering plan: `add` at each of its layers.
fn fixture_plan(model: &Model, steering: &Value) -> tiller::steering::spec::SteeringPlan {
    let d = model.dims();
    let specs: Vec<InterventionSpec> = steering["layers"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(layer, values)| InterventionSpec {
            values: Some(serde_json::from_value(values.clone()).unwrap()),
            layer: Some(layer.parse().unwrap()),
            coefficient: Some(1.0),
            ..Default::default()
        })
        .collect();
    let store = VectorStore::in_memory(ModelShape {
        model_id: model.id.clone(),
        d_model: d.d_model,
        n_neurons: d.intermediate_size,
        head_width: d.n_heads * d.head_dim,
    });
    validate(&specs, &ModelLimits::new(d, 8, &store, &Default::default())).unwrap()
}

fn check_agreement(model: &Model, name: &str) {
    let f = fixture("fidelity", name);
    let unsteered_runs = f["unsteered"].as_array().unwrap();
    let plain = total_agreement(model, unsteered_runs, |_| Box::new(NoHooks));
    println!(
        "{name}: unsteered, {}/{} next tokens agree with llama.cpp; mean |log-prob difference| {:.4}; top-2 margins (llama.cpp, tiller) where they differ: {:?}",
        plain.agree,
        plain.total,
        plain.mean_logprob_diff(),
        plain.near_ties
    );
    assert!(
        plain.rate() >= MIN_AGREEMENT,
        "{name}: {} of {} next tokens agree with llama.cpp",
        plain.agree,
        plain.total
    );
    plain.check_near_ties(name);
    let steering = &f["steering"];
    let plan = fixture_plan(model, steering);
    let n_layers = model.dims().n_layers;
    let steered_runs = steering["runs"].as_array().unwrap();
    let steered = total_agreement(model, steered_runs, |run| {
        let prompt_len = run["prompt_ids"].as_array().unwrap().len();
        Box::new(BatchSteering::new(
            n_layers,
            vec![(Some(&plan), prompt_len)],
        ))
    });
    // The same steered text scored by the unsteered model: far worse, so agreeing above means
    // tiller steers as llama.cpp does, not that the vector does nothing.
    let unsteered_on_steered = total_agreement(model, steered_runs, |_| Box::new(NoHooks));
    println!(
        "{name}: steered, {}/{} agree; mean |log-prob difference| {:.4}; margins where they differ {:?}; unsteered on the same text {}/{} and {:.4}",
        steered.agree,
        steered.total,
        steered.mean_logprob_diff(),
        steered.near_ties,
        unsteered_on_steered.agree,
        unsteered_on_steered.total,
        unsteered_on_steered.mean_logprob_diff()
    );
    steered.check_near_ties(name);
    assert!(
        steered.rate() >= MIN_AGREEMENT,
        "{name}: steered, {} of {} next tokens agree with llama.cpp",
        steered.agree,
        steered.total
    );
    assert!(unsteered_on_steered.rate() < 0.8 * steered.rate());
    assert!(unsteered_on_steered.mean_logprob_diff() > 4.0 * steered.mean_logprob_diff());
}

/// Tokens to the last position's logits.
type LogitsFn = Box<dyn FnMut(&[u32]) -> Vec<f32>>;

/// An independent implementation of `path`'s model, from candle-transformers, as a function
/// from tokens to the last position's logits.
///
/// Llama and Qwen2 use its quantized models, which read the GGUF as tiller does. Gemma 3 uses
/// its f32 model on the GGUF's tensors dequantized and renamed to the Hugging Face layout:
/// `quantized_gemma3` 0.11 runs Gemma's MLP with SiLU instead of GELU, so it is no reference.
fn oracle(path: &Path, arch: &str) -> LogitsFn {
    use candle_transformers::models::{quantized_llama, quantized_qwen2};
    let mut file = std::fs::File::open(path).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let dev = Device::Cpu;
    match arch {
        "llama" => {
            let mut m = quantized_llama::ModelWeights::from_gguf(content, &mut file, &dev).unwrap();
            Box::new(move |t| last_row(m.forward(&input_ids(t), 0).unwrap()))
        }
        "qwen2" => {
            let mut m = quantized_qwen2::ModelWeights::from_gguf(content, &mut file, &dev).unwrap();
            Box::new(move |t| last_row(m.forward(&input_ids(t), 0).unwrap()))
        }
        "gemma3" => gemma3_oracle(content, &mut file),
        other => panic!("no oracle for {other}"),
    }
}

fn input_ids(t: &[u32]) -> Tensor {
    Tensor::new(t, &Device::Cpu).unwrap().unsqueeze(0).unwrap()
}

/// The logits of the last position, whatever leading dimensions an oracle returns.
fn last_row(l: Tensor) -> Vec<f32> {
    let v = l.to_dtype(candle_core::DType::F32).unwrap();
    let n = v.dims().last().copied().unwrap();
    let flat: Vec<f32> = v.flatten_all().unwrap().to_vec1().unwrap();
    flat[flat.len() - n..].to_vec()
}

/// candle-transformers' f32 Gemma 3 on a Gemma 3 GGUF's weights.
fn gemma3_oracle(content: gguf_file::Content, file: &mut std::fs::File) -> LogitsFn {
    use candle_transformers::models::gemma3;
    let dev = Device::Cpu;
    let md = |k: &str| content.metadata[&format!("gemma3.{k}")].clone();
    let int = |k: &str| md(k).to_u32().unwrap() as usize;
    let mut tensors = std::collections::HashMap::new();
    for name in content.tensor_infos.keys() {
        let t = content
            .tensor(file, name, &dev)
            .unwrap()
            .dequantize(&dev)
            .unwrap();
        let hf = gemma3_hf_name(name);
        // llama.cpp stored Gemma's (1 + w) norm weights with the 1 added; candle adds it.
        let t = if hf.ends_with("norm.weight") {
            (t - 1.0).unwrap()
        } else {
            t
        };
        tensors.insert(hf, t);
    }
    let window = int("attention.sliding_window");
    let cfg: gemma3::Config = serde_json::from_value(serde_json::json!({
        "attention_bias": false,
        "head_dim": int("attention.key_length"),
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": int("embedding_length"),
        "intermediate_size": int("feed_forward_length"),
        "num_attention_heads": int("attention.head_count"),
        "num_hidden_layers": int("block_count"),
        "num_key_value_heads": int("attention.head_count_kv"),
        "rms_norm_eps": md("attention.layer_norm_rms_epsilon").to_f32().unwrap(),
        "rope_theta": md("rope.freq_base").to_f32().unwrap(),
        "rope_local_base_freq": 10000.0,
        "vocab_size": tensors["model.embed_tokens.weight"].dim(0).unwrap(),
        "final_logit_softcapping": null,
        "attn_logit_softcapping": null,
        "query_pre_attn_scalar": int("attention.key_length"),
        // candle's local layers see window + 1 keys, llama.cpp's and Hugging Face's window.
        "sliding_window": window - 1,
        "sliding_window_pattern": 6,
        "max_position_embeddings": 512,
    }))
    .unwrap();
    let vb = candle_nn::VarBuilder::from_tensors(tensors, candle_core::DType::F32, &dev);
    let mut m = gemma3::Model::new(false, &cfg, vb).unwrap();
    Box::new(move |t| {
        m.clear_kv_cache();
        last_row(m.forward(&input_ids(t), 0).unwrap())
    })
}

/// A Gemma 3 GGUF tensor's Hugging Face name.
fn gemma3_hf_name(gguf: &str) -> String {
    match gguf {
        "token_embd.weight" => return "model.embed_tokens.weight".into(),
        "output_norm.weight" => return "model.norm.weight".into(),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.").unwrap();
    let (l, name) = rest.split_once('.').unwrap();
    let hf = match name {
        "attn_norm.weight" => "input_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "attn_q_norm.weight" => "self_attn.q_norm.weight",
        "attn_k_norm.weight" => "self_attn.k_norm.weight",
        "post_attention_norm.weight" => "post_attention_layernorm.weight",
        "ffn_norm.weight" => "pre_feedforward_layernorm.weight",
        "post_ffw_norm.weight" => "post_feedforward_layernorm.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        other => panic!("unexpected Gemma 3 tensor {other}"),
    };
    format!("model.layers.{l}.{hf}")
}

/// tiller's next-token logits on the fixture prompts against the oracle's: the same top
/// token, and differences small against the spread of the logits.
fn check_oracle(model: &Model, path: &Path, name: &str) {
    let mut reference = oracle(path, &model.dims().architecture);
    let f = fixture("fidelity", name);
    for run in f["unsteered"].as_array().unwrap() {
        let prompt = ids(&run["prompt_ids"]);
        let ours = model
            .run_fresh(&[&prompt], Logits::Last, usize::MAX, &mut NoHooks)
            .unwrap()
            .remove(0)
            .remove(0);
        let theirs = reference(&prompt);
        assert_eq!(ours.len(), theirs.len());
        let mean = ours.iter().sum::<f32>() / ours.len() as f32;
        let spread =
            (ours.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / ours.len() as f32).sqrt();
        let mean_diff = ours
            .iter()
            .zip(&theirs)
            .map(|(a, b)| (a - b).abs())
            .sum::<f32>()
            / ours.len() as f32;
        let mut order: Vec<usize> = (0..ours.len()).collect();
        order.sort_by(|&a, &b| theirs[b].total_cmp(&theirs[a]));
        let top_diff = order[..20]
            .iter()
            .map(|&i| (ours[i] - theirs[i]).abs())
            .fold(0f32, f32::max);
        println!(
            "{name} {:?}: mean |logit difference| {mean_diff:.4}, largest on the top 20 {top_diff:.3}, logit spread {spread:.3}",
            run["prompt"].as_str().unwrap()
        );
        assert_eq!(
            argmax(&ours),
            argmax(&theirs),
            "{name}: the top token differs from candle-transformers'"
        );
        assert!(
            mean_diff < 0.1 * spread && top_diff < 0.25 * spread,
            "{name}: logits differ from candle-transformers' by {mean_diff} on average, {top_diff} on the top 20 (spread {spread})"
        );
    }
}

/// Greedy `POST /generate` on the fixture's prompts gives the tokens a plain greedy loop over
/// the model gives (whose agreement with llama.cpp `check_agreement` measures): the engine's
/// path on real weights.
async fn check_generate_over_http(state: &tiller::AppState, name: &str) {
    let model = &state.engine.model;
    let f = fixture("fidelity", name);
    for run in f["unsteered"].as_array().unwrap() {
        let mut tokens = ids(&run["prompt_ids"]);
        let prompt_len = tokens.len();
        for _ in 0..8 {
            let rows = model
                .run_fresh(&[&tokens], Logits::Last, usize::MAX, &mut NoHooks)
                .unwrap();
            tokens.push(argmax(&rows[0][0]));
        }
        let want = model.tokenizer.decode(&tokens[prompt_len..]).unwrap();
        let r = common::post_json(
            state,
            "/generate",
            serde_json::json!({"prompt": run["prompt"], "max_tokens": 8, "temperature": 0,
                               "ignore_eos": true}),
        )
        .await;
        assert_eq!(r.json()["text"], want, "{name}: {}", run["prompt"]);
    }
}

/// The fixture through `POST /tokenize` and `POST /detokenize`: the same ids and text.
async fn check_tokenizer_over_http(state: &tiller::AppState, name: &str) {
    let f = fixture("tokenizer", name);
    for c in f["cases"].as_array().unwrap() {
        let r = common::post_json(
            state,
            "/tokenize",
            serde_json::json!({"prompt": c["text"], "add_special_tokens": false}),
        )
        .await;
        assert_eq!(r.json()["tokens"], c["ids"], "{name}: {}", c["text"]);
        let r = common::post_json(
            state,
            "/detokenize",
            serde_json::json!({"tokens": c["ids"]}),
        )
        .await;
        assert_eq!(r.json()["prompt"], c["decoded"], "{name}: {}", c["text"]);
    }
}

fn check_model(name: &str, fetch: bool) {
    let Some(path) = model_path(name, fetch) else {
        return;
    };
    let model = Model::load(&path, None, &LoadOptions::default()).unwrap();
    let mut cfg = common::test_config(None);
    cfg.vectors.builtin_dir = tiller::config::Config::default().vectors.builtin_dir;
    let state = tiller::server::build_state(cfg, model).unwrap();
    let model = &state.engine.model;
    if name == "gemma3-270m" {
        common::rebuild_demo_vectors(&state, &["golden_gate"]);
    }
    check_tokenizer(model, name);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(check_tokenizer_over_http(&state, name));
    rt.block_on(check_generate_over_http(&state, name));
    check_agreement(model, name);
    check_oracle(model, &path, name);
}

#[test]
fn smollm2_matches_llama_cpp_and_candle() {
    check_model("smollm2-135m-instruct", true);
}

#[test]
fn gemma3_matches_llama_cpp_and_candle() {
    check_model("gemma3-270m", true);
}

#[test]
fn qwen2_matches_llama_cpp_and_candle() {
    check_model("qwen2.5-coder-0.5b-instruct", false);
}

/// Every tensor runs in its file's format: the served process holds at most the file's bytes
/// of weights and stays, loading included, within 1.1x the file plus the runtime's allowance
/// (binary, tokenizer, KV caches, buffers), as `/info` reports after a request.
#[test]
fn served_models_hold_their_weights_packed() {
    const RUNTIME: f64 = 128.0 * (1 << 20) as f64;
    for name in [
        "smollm2-135m-instruct",
        "gemma3-270m",
        "qwen2.5-coder-0.5b-instruct",
    ] {
        let Some(path) = model_path(name, false) else {
            continue;
        };
        let server = common::Server::start_model(&path.display().to_string(), &[]);
        let addr = format!("127.0.0.1:{}", server.port);
        let body = serde_json::json!({"prompt": "The capital of France is", "max_tokens": 16});
        let (status, _) =
            tiller::loadgen::post_json(&addr, "/generate", &body.to_string()).unwrap();
        assert_eq!(status, 200);
        let info: Value = serde_json::from_str(&common::http_get(&addr, "/info")).unwrap();
        let m = &info["memory"];
        let file = m["checkpoint_bytes"].as_f64().unwrap();
        let weights = m["weight_bytes"].as_f64().unwrap();
        assert!(
            weights <= file,
            "{name}: {weights} bytes of weights from a {file}-byte file"
        );
        for key in ["resident_bytes", "peak_resident_bytes"] {
            let rss = m[key].as_f64().unwrap();
            assert!(rss >= weights, "{name}: {key} {rss} below the weights");
            assert!(
                rss <= 1.1 * file + RUNTIME,
                "{name}: {key} {rss} for a {file}-byte file"
            );
        }
    }
}
