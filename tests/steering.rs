//! Steering maths inside a real forward pass, on a tiny model of every architecture in both
//! checkpoint formats: each op changes exactly what it should at exactly the hooked points,
//! and nothing else; every site of every block is reached.

mod common;

use candle_core::quantized::GgmlDType;
use candle_core::Tensor;
use std::collections::BTreeMap;
use tiller::model::hooks::{BatchRows, HookSite, Hooks, NoHooks};
use tiller::model::Model;
use tiller::model::{Backend, PackedBatch};
use tiller::steering::intervention::BatchSteering;
use tiller::steering::spec::{validate, InterventionSpec, ModelLimits, SteeringPlan};
use tiller::steering::store::{ModelShape, VectorStore};
use tiller::steering::vector::{SteeringVector, VectorKind, VectorMeta};
use tiller::testing::{pseudo_random, write_tiny_hf, TinyArch, TinySpec};

/// Rows of an activation before and after the hooks.
type BeforeAfter = (Vec<Vec<f32>>, Vec<Vec<f32>>);

/// Wraps the steering hooks and records each hooked activation before and after them.
struct Recorder<'a> {
    inner: BatchSteering<'a>,
    /// Also record these points even when no plan acts there.
    watch: Vec<(HookSite, usize)>,
    seen: BTreeMap<(HookSite, usize), BeforeAfter>,
}

impl Hooks for Recorder<'_> {
    fn is_active(&self, site: HookSite, layer: usize) -> bool {
        self.inner.is_active(site, layer) || self.watch.contains(&(site, layer))
    }

    fn apply(
        &mut self,
        site: HookSite,
        layer: usize,
        x: &Tensor,
        rows: &BatchRows,
    ) -> candle_core::Result<Option<Tensor>> {
        let before: Vec<Vec<f32>> = x.to_vec2()?;
        let out = if self.inner.is_active(site, layer) {
            self.inner.apply(site, layer, x, rows)?
        } else {
            None
        };
        let after = match &out {
            Some(t) => t.to_vec2()?,
            None => before.clone(),
        };
        self.seen.insert((site, layer), (before, after));
        Ok(out)
    }
}

/// A tiny model of every architecture, from a GGUF file and from a Hugging Face folder.
fn models() -> Vec<(String, Model)> {
    let mut out = Vec::new();
    for arch in TinyArch::ALL {
        let spec = TinySpec::of(arch);
        out.push((
            format!("{arch:?} gguf"),
            common::tiny_model(&spec, GgmlDType::Q8_0, Backend::CpuKernels),
        ));
        let dir = tempfile::tempdir().unwrap();
        let hf = write_tiny_hf(dir.path(), &spec).unwrap();
        out.push((
            format!("{arch:?} hf"),
            Model::load(&hf, Some("tiny"), &Default::default()).unwrap(),
        ));
    }
    out
}

fn store_with(model: &Model, layers: &[(usize, Vec<f32>)]) -> VectorStore {
    let c = model.dims();
    let store = VectorStore::in_memory(ModelShape {
        model_id: "tiny".into(),
        d_model: c.d_model,
        n_neurons: c.intermediate_size,
        head_width: c.n_heads * c.head_dim,
    });
    store.insert(
        SteeringVector {
            name: "dir".into(),
            meta: VectorMeta {
                model: "tiny".into(),
                d_model: c.d_model,
                kind: VectorKind::Direction,
                method: "manual".into(),
                description: String::new(),
                created: String::new(),
                version: 1,
            },
            layers: layers.iter().map(|(l, v)| (*l, v.clone().into())).collect(),
        },
        tiller::steering::store::VectorOrigin::Stored,
    );
    store
}

fn plan(model: &Model, store: &VectorStore, specs: serde_json::Value) -> SteeringPlan {
    let specs: Vec<InterventionSpec> = serde_json::from_value(specs).unwrap();
    let c = model.dims();
    validate(&specs, &ModelLimits::new(c, 16, store, &Default::default())).unwrap()
}

const PROMPT: &[u32] = &[1, 50, 60, 70, 80, 90, 2];

/// Runs the prompt with `plan` (prompt length `prompt_len` for position rules) and returns the
/// logits and the recorded activations.
fn run(
    model: &Model,
    plan: Option<&SteeringPlan>,
    watch: Vec<(HookSite, usize)>,
    prompt_len: usize,
) -> (Vec<f32>, Recorder<'static>) {
    let plan: Option<&'static SteeringPlan> = plan.map(|p| &*Box::leak(Box::new(p.clone())));
    let mut rec = Recorder {
        inner: BatchSteering::new(model.dims().n_layers, vec![(plan, prompt_len)]),
        watch,
        seen: BTreeMap::new(),
    };
    let mut cache = model.new_cache();
    let mut b = PackedBatch::default();
    b.push(PROMPT, 0, true);
    let l = model
        .forward(&b, &mut [&mut cache], &mut rec)
        .unwrap()
        .unwrap();
    (l.squeeze(0).unwrap().to_vec1().unwrap(), rec)
}

fn plain_logits(model: &Model) -> Vec<f32> {
    let mut cache = model.new_cache();
    let mut b = PackedBatch::default();
    b.push(PROMPT, 0, true);
    model
        .forward(&b, &mut [&mut cache], &mut NoHooks)
        .unwrap()
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
}

fn unit(v: &[f32]) -> Vec<f32> {
    let n = dot(v, v).sqrt() as f32;
    v.iter().map(|x| x / n).collect()
}

#[test]
fn coefficient_zero_leaves_logits_bit_identical() {
    for (name, m) in models() {
        let v = pseudo_random(64, 3, 1.0);
        let store = store_with(&m, &[(1, v)]);
        let p = plan(
            &m,
            &store,
            serde_json::json!([{"vector": "dir", "layers": [0, 1, 2], "coefficient": 0.0}]),
        );
        let (steered, _) = run(&m, Some(&p), vec![], PROMPT.len());
        assert_eq!(steered, plain_logits(&m), "{name}");
        // While a non-zero coefficient does change them.
        let p = plan(
            &m,
            &store,
            serde_json::json!([{"vector": "dir", "layer": 1, "coefficient": 4.0}]),
        );
        assert_ne!(
            run(&m, Some(&p), vec![], PROMPT.len()).0,
            plain_logits(&m),
            "{name}"
        );
    }
}

#[test]
fn add_changes_the_hooked_residual_by_exactly_c_times_v() {
    for (name, m) in models() {
        let v = pseudo_random(64, 4, 1.0);
        let store = store_with(&m, &[(1, v.clone())]);
        let c = 2.5f32;
        let p = plan(
            &m,
            &store,
            serde_json::json!([{"vector": "dir", "layer": 1, "coefficient": c}]),
        );
        let (_, rec) = run(&m, Some(&p), vec![], PROMPT.len());
        let (before, after) = &rec.seen[&(HookSite::ResidPost, 1)];
        for (b, a) in before.iter().zip(after) {
            for j in 0..64 {
                assert_eq!(a[j], b[j] + c * v[j], "{name}");
            }
        }
        // With normalize, the shift is c times the unit vector.
        let p = plan(
            &m,
            &store,
            serde_json::json!([{"vector": "dir", "layer": 1, "coefficient": c, "normalize": true}]),
        );
        let (_, rec) = run(&m, Some(&p), vec![], PROMPT.len());
        let (before, after) = &rec.seen[&(HookSite::ResidPost, 1)];
        let n = dot(&v, &v).sqrt() as f32;
        for (b, a) in before.iter().zip(after) {
            let shift: Vec<f32> = a.iter().zip(b).map(|(x, y)| x - y).collect();
            assert!(
                (dot(&shift, &shift).sqrt() - c as f64).abs() < 1e-4,
                "{name}"
            );
            assert!((shift[0] - c / n * v[0]).abs() < 1e-5);
        }
    }
}

#[test]
fn ablate_leaves_no_component_at_any_hooked_point() {
    for (name, m) in models() {
        let v = pseudo_random(64, 5, 1.0);
        let u = unit(&v);
        let store = store_with(&m, &[(0, v.clone())]);
        // At chosen layers of resid_post.
        let p = plan(
            &m,
            &store,
            serde_json::json!([{"vector": "dir", "op": "ablate", "layers": [0, 2]}]),
        );
        let (_, rec) = run(&m, Some(&p), vec![], PROMPT.len());
        for l in [0, 2] {
            let (before, after) = &rec.seen[&(HookSite::ResidPost, l)];
            assert!(
                before.iter().any(|h| dot(h, &u).abs() > 0.1),
                "{name}: the test needs a component to remove"
            );
            for h in after {
                assert!(
                    dot(h, &u).abs() < 1e-4 * dot(h, h).sqrt().max(1.0),
                    "{name} layer {l}: {}",
                    dot(h, &u)
                );
            }
        }
        // With no layer: the embeddings and every attention and MLP write, so every residual
        // stream is orthogonal to the direction.
        let n = m.dims().n_layers;
        let watch: Vec<_> = (0..n).map(|l| (HookSite::ResidPost, l)).collect();
        let p = plan(
            &m,
            &store,
            serde_json::json!([{"vector": "dir", "op": "ablate"}]),
        );
        let (_, rec) = run(&m, Some(&p), watch, PROMPT.len());
        assert!(rec.seen.contains_key(&(HookSite::ResidPre, 0)), "{name}");
        for l in 0..n {
            for site in [HookSite::AttnOut, HookSite::MlpOut] {
                for h in &rec.seen[&(site, l)].1 {
                    assert!(
                        dot(h, &u).abs() < 1e-4 * dot(h, h).sqrt().max(1.0),
                        "{name}"
                    );
                }
            }
            for h in &rec.seen[&(HookSite::ResidPost, l)].1 {
                assert!(
                    dot(h, &u).abs() < 1e-3 * dot(h, h).sqrt().max(1.0),
                    "{name} resid_post {l}: {}",
                    dot(h, &u)
                );
            }
        }
    }
}

#[test]
fn clamp_sets_the_projection() {
    for (name, m) in models() {
        let v = pseudo_random(64, 6, 1.0);
        let u = unit(&v);
        let store = store_with(&m, &[(1, v)]);
        let p = plan(
            &m,
            &store,
            serde_json::json!([{"vector": "dir", "op": "clamp", "layer": 1, "coefficient": 7.5}]),
        );
        let (_, rec) = run(&m, Some(&p), vec![], PROMPT.len());
        let (before, after) = &rec.seen[&(HookSite::ResidPost, 1)];
        for (b, a) in before.iter().zip(after) {
            assert!((dot(a, &u) - 7.5).abs() < 1e-4, "{name}");
            // Only the component along u moved.
            let shift: Vec<f32> = a.iter().zip(b).map(|(x, y)| x - y).collect();
            let along = dot(&shift, &u);
            assert!((dot(&shift, &shift) - along * along).abs() < 1e-6 * (1.0 + along * along));
        }
    }
}

#[test]
fn neuron_ops_change_exactly_that_neuron() {
    for (name, m) in models() {
        let store = store_with(&m, &[(0, pseudo_random(64, 7, 1.0))]);
        for (op, coef, expect) in [
            ("zero", None, Some(0.0f32)),
            ("set", Some(3.25), Some(3.25)),
            ("scale", Some(-2.0), None),
        ] {
            let mut spec = serde_json::json!({"neuron": {"layer": 1, "index": 17}, "op": op});
            if let Some(c) = coef {
                spec["coefficient"] = c.into();
            }
            let p = plan(&m, &store, serde_json::json!([spec]));
            let (_, rec) = run(&m, Some(&p), vec![], PROMPT.len());
            let (before, after) = &rec.seen[&(HookSite::MlpAct, 1)];
            for (b, a) in before.iter().zip(after) {
                for j in 0..b.len() {
                    if j == 17 {
                        let want = expect.unwrap_or(b[j] * -2.0);
                        assert_eq!(a[j], want, "{name} {op}");
                    } else {
                        assert_eq!(a[j], b[j], "{name}: {op} touched neuron {j}");
                    }
                }
            }
        }
    }
}

#[test]
fn positions_select_rows() {
    for (name, m) in models() {
        let v = pseudo_random(64, 8, 1.0);
        let store = store_with(&m, &[(1, v)]);
        // Pretend the first 4 tokens are the prompt and the rest were generated.
        for (positions, touched) in [
            (serde_json::json!("prompt"), vec![0, 1, 2, 3]),
            (serde_json::json!("generated"), vec![4, 5, 6]),
            (serde_json::json!({"last": 2}), vec![2, 3, 4, 5, 6]),
            (serde_json::json!("all"), vec![0, 1, 2, 3, 4, 5, 6]),
        ] {
            let p = plan(
                &m,
                &store,
                serde_json::json!([{"vector": "dir", "layer": 1, "coefficient": 1.0, "positions": positions}]),
            );
            let (_, rec) = run(&m, Some(&p), vec![], 4);
            let (before, after) = &rec.seen[&(HookSite::ResidPost, 1)];
            let got: Vec<usize> = (0..before.len())
                .filter(|&r| before[r] != after[r])
                .collect();
            assert_eq!(got, touched, "{name} {positions}");
        }
    }
}

#[test]
fn every_site_of_every_block_is_hooked_and_add_acts_there() {
    for (name, m) in models() {
        let d = m.dims().clone();
        let v = pseudo_random(d.d_model, 9, 1.0);
        let store = store_with(&m, &[(0, v.clone())]);
        let all: Vec<(HookSite, usize)> = (0..d.n_layers)
            .flat_map(|l| HookSite::ALL.into_iter().map(move |s| (s, l)))
            .collect();
        let (_, rec) = run(&m, None, all.clone(), PROMPT.len());
        for &(site, l) in &all {
            let (before, _) = &rec.seen[&(site, l)];
            let width = d.site_width(site);
            assert_eq!(before.len(), PROMPT.len(), "{name} {site} {l}");
            assert!(before.iter().all(|r| r.len() == width), "{name} {site} {l}");
        }
        let plain = plain_logits(&m);
        for site in [
            HookSite::ResidPre,
            HookSite::AttnOut,
            HookSite::MlpOut,
            HookSite::ResidPost,
        ] {
            let l = d.n_layers / 2;
            let p = plan(
                &m,
                &store,
                serde_json::json!([{"vector": "dir", "layer": l, "site": site.as_str(), "coefficient": 3.0}]),
            );
            let (logits, rec) = run(&m, Some(&p), vec![], PROMPT.len());
            let (before, after) = &rec.seen[&(site, l)];
            for (b, a) in before.iter().zip(after) {
                for j in 0..d.d_model {
                    assert_eq!(a[j], b[j] + 3.0 * v[j], "{name} {site}");
                }
            }
            assert_ne!(logits, plain, "{name}: add at {site} {l} changed nothing");
        }
    }
}

/// Head ops and directions in a head change that head's values exactly and no other value of
/// `attn_head`; scaling a head by 1 changes nothing at all.
#[test]
fn head_ops_change_exactly_that_head() {
    for (name, m) in models() {
        let d = m.dims().clone();
        let (hd, l, h) = (d.head_dim, 1, d.n_heads - 1);
        let store = store_with(&m, &[(0, pseudo_random(d.d_model, 7, 1.0))]);
        let v = pseudo_random(hd, 11, 1.0);
        let cases = [
            serde_json::json!({"site": "attn_head", "layer": l, "head": h, "op": "zero"}),
            serde_json::json!({"layer": l, "head": h, "op": "scale", "coefficient": -2.0}),
            serde_json::json!({"layer": l, "head": h, "values": v, "coefficient": 1.5}),
        ];
        for (k, spec) in cases.into_iter().enumerate() {
            let p = plan(&m, &store, serde_json::json!([spec]));
            let (logits, rec) = run(&m, Some(&p), vec![], PROMPT.len());
            assert_ne!(logits, plain_logits(&m), "{name} case {k} changed nothing");
            let (before, after) = &rec.seen[&(HookSite::AttnHead, l)];
            for (b, a) in before.iter().zip(after) {
                assert_eq!(b.len(), d.n_heads * hd, "{name}");
                for j in 0..b.len() {
                    let want = match (j / hd == h, k) {
                        (false, _) => b[j],
                        (true, 0) => 0.0,
                        (true, 1) => b[j] * -2.0,
                        (true, _) => b[j] + 1.5 * v[j % hd],
                    };
                    assert_eq!(a[j], want, "{name} case {k} value {j}");
                }
            }
        }
        let p = plan(
            &m,
            &store,
            serde_json::json!([{"layer": l, "head": 0, "op": "scale", "coefficient": 1.0}]),
        );
        assert_eq!(
            run(&m, Some(&p), vec![], PROMPT.len()).0,
            plain_logits(&m),
            "{name}"
        );
    }
}

/// A full pass of `tokens` with the source's activations patched in at `patches`: the
/// reference a patched run from a cached prefix must equal.
fn full_patched_metric(
    m: &Model,
    tokens: &[u32],
    site: HookSite,
    source: &tiller::steering::patch::SourceActs,
    patches: &[tiller::steering::patch::PatchPoint],
    metric: tiller::steering::patch::Metric,
) -> f32 {
    let points = [patches.to_vec()];
    let mut hooks = tiller::steering::patch::PatchHooks::new(site, source, &points);
    let mut cache = m.new_cache();
    let mut b = PackedBatch::default();
    b.push(tokens, 0, true);
    let l = m
        .forward(&b, &mut [&mut cache], &mut hooks)
        .unwrap()
        .unwrap();
    metric.of(&l.squeeze(0).unwrap().to_vec1::<f32>().unwrap())
}

/// Activation patching is exact: patching nothing gives the corrupted metric bit for bit,
/// patching the whole residual of one layer at every position gives the clean metric, and a
/// patched run from the cached prefix equals the full patched pass, at every site.
#[test]
fn patching_is_exact() {
    use tiller::steering::patch::{patched_metrics, BaseRun, Metric, PatchPoint, SourceRecorder};
    let clean: &[u32] = PROMPT;
    let corrupted: Vec<u32> = PROMPT
        .iter()
        .enumerate()
        .map(|(i, &t)| if i == 2 { 33 } else { t })
        .collect();
    let metric = Metric::LogitDiff { a: 5, b: 9 };
    for (name, m) in models() {
        let d = m.dims().clone();
        let n = clean.len();
        for site in [HookSite::ResidPre, HookSite::AttnHead, HookSite::MlpOut] {
            let layers: Vec<usize> = (0..d.n_layers).collect();
            let mut rec = SourceRecorder::new(site, layers.clone(), n);
            let mut cache = m.new_cache();
            let mut b = PackedBatch::default();
            b.push(clean, 0, true);
            let l = m.forward(&b, &mut [&mut cache], &mut rec).unwrap().unwrap();
            let clean_metric = metric.of(&l.squeeze(0).unwrap().to_vec1::<f32>().unwrap());
            let source = rec.finish();
            let mut base_cache = m.new_cache();
            let mut b = PackedBatch::default();
            b.push(&corrupted, 0, true);
            let l = m
                .forward(&b, &mut [&mut base_cache], &mut NoHooks)
                .unwrap()
                .unwrap();
            let corrupted_metric = metric.of(&l.squeeze(0).unwrap().to_vec1::<f32>().unwrap());
            assert_ne!(clean_metric, corrupted_metric, "{name}");
            let at = |layer, position| PatchPoint {
                layer,
                position,
                span: (site == HookSite::AttnHead).then_some((d.head_dim, d.head_dim)),
            };
            let mut patches = vec![vec![]];
            for l in 0..d.n_layers {
                for p in 0..n {
                    patches.push(vec![at(l, p)]);
                }
            }
            if site == HookSite::ResidPre {
                patches.push((0..n).map(|p| at(1, p)).collect());
            }
            let mut base_rec = SourceRecorder::new(HookSite::ResidPre, layers.clone(), n);
            let mut cache = m.new_cache();
            let mut b = PackedBatch::default();
            b.push(&corrupted, 0, true);
            m.forward(&b, &mut [&mut cache], &mut base_rec).unwrap();
            let resid_pre = base_rec.finish();
            let base = BaseRun {
                tokens: &corrupted,
                cache: &base_cache,
                resid_pre: &resid_pre,
            };
            let got = patched_metrics(&m, &base, site, &source, &patches, metric).unwrap();
            // Runs batched by block start at that block: the same numbers.
            let mut by_block = vec![got[0]];
            for l in 0..d.n_layers {
                let block: Vec<Vec<PatchPoint>> = (0..n).map(|p| vec![at(l, p)]).collect();
                by_block.extend(patched_metrics(&m, &base, site, &source, &block, metric).unwrap());
            }
            assert_eq!(
                by_block[..],
                got[..by_block.len()],
                "{name} {site}: started at the block"
            );
            assert_eq!(got[0], corrupted_metric, "{name} {site}: patching nothing");
            for (k, ps) in patches.iter().enumerate().skip(1) {
                let want = full_patched_metric(&m, &corrupted, site, &source, ps, metric);
                assert_eq!(got[k], want, "{name} {site}: {ps:?}");
                // Before the corrupted token nothing differs, so nothing changes.
                if ps.len() == 1 && ps[0].position < 2 {
                    assert_eq!(got[k], corrupted_metric, "{name} {site}: {ps:?}");
                }
            }
            if site == HookSite::ResidPre {
                let whole = got[got.len() - 1];
                assert_eq!(whole, clean_metric, "{name}: the whole residual of layer 1");
            }
        }
    }
}

/// Conditional steering decides inside the pass: a prompt condition that always holds acts
/// like the same intervention on the last prompt token and after; one that never holds
/// changes nothing; the decision is made on the mean reading over the prompt (all but the
/// first token), and a token condition acts on exactly the rows whose own reading holds.
#[test]
fn conditions_decide_inside_the_pass() {
    for (name, m) in models() {
        let d = m.dims().clone();
        let v = pseudo_random(d.d_model, 12, 1.0);
        let store = store_with(&m, &[(0, v.clone())]);
        let add = serde_json::json!({"vector": "dir", "layer": 1, "coefficient": 3.0});
        let with_when = |when: serde_json::Value| {
            let mut spec = add.clone();
            spec["when"] = when;
            plan(&m, &store, serde_json::json!([spec]))
        };
        // Decided at layer 0, in the pass that reads the whole prompt: block 1 is steered on
        // every row, as without a condition.
        let unconditioned = plan(&m, &store, serde_json::json!([add]));
        let on_last = run(&m, Some(&unconditioned), vec![], PROMPT.len()).0;
        let always = with_when(serde_json::json!({"vector": "dir", "layer": 0, "above": -2.0}));
        let got = run(&m, Some(&always), vec![], PROMPT.len()).0;
        assert_eq!(got, on_last, "{name}");
        // Decided only at block 1's output: block 0 has run by then, so this pass is unsteered
        // (generated tokens would be steered).
        let mut early = serde_json::json!({"vector": "dir", "layer": 0, "coefficient": 3.0});
        early["when"] = serde_json::json!({"vector": "dir", "layer": 1, "above": -2.0});
        let p = plan(&m, &store, serde_json::json!([early]));
        let got = run(&m, Some(&p), vec![], PROMPT.len()).0;
        assert_eq!(got, plain_logits(&m), "{name}");
        let never = with_when(serde_json::json!({"vector": "dir", "layer": 0, "above": 2.0}));
        assert_eq!(
            run(&m, Some(&never), vec![], PROMPT.len()).0,
            plain_logits(&m),
            "{name}"
        );

        // The mean cosine over positions 1.. of block 0's output.
        let (_, rec) = run(&m, None, vec![(HookSite::ResidPost, 0)], PROMPT.len());
        let rows = &rec.seen[&(HookSite::ResidPost, 0)].0;
        let cos = |h: &[f32]| (dot(h, &v) / (dot(h, h).sqrt() * dot(&v, &v).sqrt())) as f32;
        let readings: Vec<f32> = rows.iter().map(|h| cos(h)).collect();
        let mean = readings[1..].iter().map(|&x| x as f64).sum::<f64>() / (rows.len() - 1) as f64;
        for (delta, fires) in [(-1e-3, true), (1e-3, false)] {
            let p =
                with_when(serde_json::json!({"vector": "dir", "layer": 0, "above": mean + delta}));
            let (logits, rec) = run(&m, Some(&p), vec![], PROMPT.len());
            let trace = rec.inner.into_traces().pop().unwrap();
            let report = trace.report(&p, PROMPT.len(), 0);
            assert_eq!(report[0].fired, fires, "{name}");
            assert!(
                (report[0].value.unwrap() as f64 - mean).abs() < 1e-5,
                "{name}"
            );
            assert_eq!(logits == on_last, fires, "{name}");
        }

        // Token scope at the median reading: exactly the rows above it are steered at layer 1.
        let mut sorted = readings.clone();
        sorted.sort_by(f32::total_cmp);
        let k = sorted.len() / 2;
        let t = (sorted[k - 1] + sorted[k]) / 2.0;
        let p = with_when(
            serde_json::json!({"vector": "dir", "layer": 0, "above": t, "scope": "token"}),
        );
        let (_, rec) = run(&m, Some(&p), vec![], PROMPT.len());
        let (before, after) = &rec.seen[&(HookSite::ResidPost, 1)];
        for (r, (b, a)) in before.iter().zip(after).enumerate() {
            assert_eq!(b != a, readings[r] > t, "{name} row {r}");
        }
        let fired = rec.inner.into_traces().pop().unwrap().conditions[0]
            .fired_positions
            .clone();
        let want: Vec<usize> = (0..readings.len()).filter(|&r| readings[r] > t).collect();
        assert_eq!(fired, want, "{name}");
    }
}
