//! The tensor table of a GGUF file read without interpreting it: each tensor's name and GGML
//! type id. candle's GGUF reader stops at the first type it does not know ("unknown dtype"),
//! which says nothing about which tensor or what to do; this reader lets tiller refuse such a
//! file (IQ-quants, ternary and MXFP4 blocks) with the tensor, its format and the fix.
//!
//! Layout (GGUF v2 and v3): magic `GGUF`, version `u32`, tensor count `u64`, metadata count
//! `u64`, the metadata (`string` key, `u32` type, value), then per tensor a `string` name, `u32`
//! dimension count, `u64` dimensions, `u32` type, `u64` offset. Strings are a `u64` length and
//! bytes. Every length is checked against the file's size, so a hostile header ends in an
//! error, never a large allocation or a long loop.

use anyhow::{bail, Context, Result};
use std::io::{Read, Seek, SeekFrom};

/// What to do about a format tiller cannot run, in every refusal.
pub const REQUANTIZE: &str = "requantize the file with llama.cpp's llama-quantize to one tiller \
                              runs (Q4_K_M, Q5_K_M, Q6_K, Q8_0, Q4_0 or Q4_1)";

/// The one-line refusal of tensor `name` stored as `format`.
pub fn unsupported_format(name: &str, format: &str) -> String {
    format!("tensor `{name}` is stored as {format}, a block format tiller cannot run; {REQUANTIZE}")
}

/// The name llama.cpp gives GGML type `id`.
pub fn type_name(id: u32) -> Option<&'static str> {
    const NAMES: [(u32, &str); 33] = [
        (0, "F32"),
        (1, "F16"),
        (2, "Q4_0"),
        (3, "Q4_1"),
        (6, "Q5_0"),
        (7, "Q5_1"),
        (8, "Q8_0"),
        (9, "Q8_1"),
        (10, "Q2_K"),
        (11, "Q3_K"),
        (12, "Q4_K"),
        (13, "Q5_K"),
        (14, "Q6_K"),
        (15, "Q8_K"),
        (16, "IQ2_XXS"),
        (17, "IQ2_XS"),
        (18, "IQ3_XXS"),
        (19, "IQ1_S"),
        (20, "IQ4_NL"),
        (21, "IQ3_S"),
        (22, "IQ2_S"),
        (23, "IQ4_XS"),
        (24, "I8"),
        (25, "I16"),
        (26, "I32"),
        (27, "I64"),
        (28, "F64"),
        (29, "IQ1_M"),
        (30, "BF16"),
        (34, "TQ1_0"),
        (35, "TQ2_0"),
        (39, "MXFP4"),
        (40, "NVFP4"),
    ];
    NAMES.iter().find(|(i, _)| *i == id).map(|(_, n)| *n)
}

/// Whether candle's GGUF reader knows type `id` (the others are refused by name before it runs).
fn candle_reads(id: u32) -> bool {
    matches!(id, 0..=3 | 6..=15 | 30)
}

/// The first tensor of the file at `r` whose type candle's reader does not know, as the
/// one-line refusal; `None` when every type is known or the header cannot be read this way
/// (then candle's own error stands).
pub fn refusal(r: &mut (impl Read + Seek)) -> Option<String> {
    let tensors = tensor_types(r).ok()?;
    let (name, id) = tensors.into_iter().find(|(_, id)| !candle_reads(*id))?;
    let format = match type_name(id) {
        Some(n) => n.to_string(),
        None => format!("GGML type {id}"),
    };
    Some(unsupported_format(&name, &format))
}

/// Every tensor's name and GGML type id, in file order.
pub fn tensor_types(r: &mut (impl Read + Seek)) -> Result<Vec<(String, u32)>> {
    let size = r.seek(SeekFrom::End(0))?;
    r.seek(SeekFrom::Start(0))?;
    let mut h = Header { r, size };
    if &h.bytes::<4>()? != b"GGUF" {
        bail!("not a GGUF file");
    }
    let version = h.u32()?;
    if !(2..=3).contains(&version) {
        bail!("GGUF version {version}");
    }
    let (n_tensors, n_kv) = (h.count()?, h.count()?);
    for _ in 0..n_kv {
        let key = h.string()?;
        let ty = h.u32()?;
        if key == "general.alignment" {
            // The reader rounds offsets up to it: 0 would divide by zero.
            let alignment = match ty {
                4 => h.u32()? as u64,
                _ => bail!("general.alignment has GGUF type {ty}, expected u32"),
            };
            if !alignment.is_power_of_two() {
                bail!("general.alignment is {alignment}, expected a power of two");
            }
        } else {
            h.skip_value(ty, 0)?;
        }
    }
    let mut out = Vec::with_capacity(n_tensors.min(1 << 16) as usize);
    for _ in 0..n_tensors {
        let name = h.string()?;
        let n_dims = h.u32()?;
        if n_dims > 8 {
            bail!("tensor `{name}` has {n_dims} dimensions");
        }
        // A tensor cannot hold more values than four per byte of the file (no format packs
        // more); this also keeps the product from overflowing.
        let mut elems: u64 = 1;
        for _ in 0..n_dims {
            let d = u64::from_le_bytes(h.bytes()?);
            elems = elems.saturating_mul(d);
        }
        if elems > size.saturating_mul(4) {
            bail!("tensor `{name}` declares {elems} values in a file of {size} bytes");
        }
        let ty = h.u32()?;
        h.skip(8)?;
        out.push((name, ty));
    }
    Ok(out)
}

/// Refuses a header that would make a GGUF reader divide by zero, overflow or allocate
/// beyond the file (call before handing untrusted bytes to candle).
pub fn check(r: &mut (impl Read + Seek)) -> Result<()> {
    tensor_types(r)?;
    r.seek(SeekFrom::Start(0))?;
    Ok(())
}

struct Header<'a, R> {
    r: &'a mut R,
    size: u64,
}

impl<R: Read + Seek> Header<'_, R> {
    fn bytes<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut b = [0u8; N];
        self.r
            .read_exact(&mut b)
            .context("the GGUF header ends early")?;
        Ok(b)
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }

    /// A `u64` count or length, which cannot exceed the file's size.
    fn count(&mut self) -> Result<u64> {
        let n = u64::from_le_bytes(self.bytes()?);
        if n > self.size {
            bail!("a GGUF length of {n} in a file of {} bytes", self.size);
        }
        Ok(n)
    }

    /// Skips `n` bytes: short runs are read (a buffered reader keeps its buffer), long ones
    /// sought over.
    fn skip(&mut self, n: u64) -> Result<()> {
        if n <= 1 << 12 {
            let read = std::io::copy(&mut self.r.by_ref().take(n), &mut std::io::sink())?;
            if read < n {
                bail!("the GGUF header ends early");
            }
            return Ok(());
        }
        let at = self.r.stream_position()?;
        match at.checked_add(n) {
            Some(end) if end <= self.size => {
                self.r.seek(SeekFrom::Start(end))?;
                Ok(())
            }
            _ => bail!("the GGUF header ends early"),
        }
    }

    /// A key or a tensor name.
    fn string(&mut self) -> Result<String> {
        let n = self.count()?;
        if n > 1 << 16 {
            bail!("a GGUF name of {n} bytes");
        }
        let mut b = vec![0u8; n as usize];
        self.r
            .read_exact(&mut b)
            .context("the GGUF header ends early")?;
        Ok(String::from_utf8_lossy(&b).into_owned())
    }

    fn skip_string(&mut self) -> Result<()> {
        let n = self.count()?;
        self.skip(n)
    }

    /// Skips one metadata value of type `ty` (arrays nest at most a few levels).
    fn skip_value(&mut self, ty: u32, depth: u32) -> Result<()> {
        match ty {
            8 => self.skip_string(),
            9 if depth < 4 => {
                let (item, n) = (self.u32()?, self.count()?);
                match item {
                    8 | 9 => (0..n).try_for_each(|_| self.skip_value(item, depth + 1)),
                    _ => self.skip(
                        n.checked_mul(width(item)?)
                            .context("a GGUF array too long")?,
                    ),
                }
            }
            _ => self.skip(width(ty)?),
        }
    }
}

/// The size of a scalar metadata value of type `ty`.
fn width(ty: u32) -> Result<u64> {
    Ok(match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        10..=12 => 8,
        _ => bail!("GGUF metadata type {ty}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
    use candle_core::{Device, Tensor};
    use std::io::Cursor;

    fn file(types: &[(&str, GgmlDType)]) -> Vec<u8> {
        let t = Tensor::zeros((2, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
        let tensors: Vec<(&str, QTensor)> = types
            .iter()
            .map(|(n, d)| (*n, QTensor::quantize(&t, *d).unwrap()))
            .collect();
        let md = [
            ("general.name", gguf_file::Value::String("t".into())),
            (
                "tokens",
                gguf_file::Value::Array(vec![gguf_file::Value::String("a".into()); 3]),
            ),
            ("eps", gguf_file::Value::F32(1e-5)),
        ];
        let md: Vec<_> = md.iter().map(|(k, v)| (*k, v)).collect();
        let t_refs: Vec<_> = tensors.iter().map(|(n, q)| (*n, q)).collect();
        let mut out = Cursor::new(Vec::new());
        gguf_file::write(&mut out, &md, &t_refs).unwrap();
        out.into_inner()
    }

    /// Sets the type id of tensor `name` in a written file.
    fn retype(bytes: &mut [u8], name: &str, id: u32) {
        let at = bytes
            .windows(name.len())
            .position(|w| w == name.as_bytes())
            .unwrap();
        let dims_at = at + name.len();
        let n_dims = u32::from_le_bytes(bytes[dims_at..dims_at + 4].try_into().unwrap()) as usize;
        let ty_at = dims_at + 4 + 8 * n_dims;
        bytes[ty_at..ty_at + 4].copy_from_slice(&id.to_le_bytes());
    }

    #[test]
    fn lists_tensors_and_refuses_unknown_types_by_name() {
        let mut bytes = file(&[("a.weight", GgmlDType::Q8_0), ("b.weight", GgmlDType::F32)]);
        let types = tensor_types(&mut Cursor::new(&bytes)).unwrap();
        assert_eq!(types, [("a.weight".into(), 8), ("b.weight".into(), 0)]);
        assert_eq!(refusal(&mut Cursor::new(&bytes)), None);
        retype(&mut bytes, "b.weight", 23);
        assert!(gguf_file::Content::read(&mut Cursor::new(&bytes)).is_err());
        let msg = refusal(&mut Cursor::new(&bytes)).unwrap();
        assert!(
            msg.contains("`b.weight`") && msg.contains("IQ4_XS"),
            "{msg}"
        );
        assert!(
            msg.contains("llama-quantize") && !msg.contains('\n'),
            "{msg}"
        );
        retype(&mut bytes, "b.weight", 77);
        assert!(refusal(&mut Cursor::new(&bytes))
            .unwrap()
            .contains("GGML type 77"));
    }

    /// Alignment 0 (a division by zero in candle's reader) and dimensions whose product
    /// overflows are refused before candle sees the file.
    #[test]
    fn headers_that_would_crash_a_reader_are_refused() {
        let t = Tensor::zeros((2, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, GgmlDType::F32).unwrap();
        let write = |alignment: gguf_file::Value| {
            let md = [("general.alignment", alignment)];
            let md: Vec<_> = md.iter().map(|(k, v)| (*k, v)).collect();
            let mut out = Cursor::new(Vec::new());
            gguf_file::write(&mut out, &md, &[("a", &q)]).unwrap();
            out.into_inner()
        };
        assert!(check(&mut Cursor::new(write(gguf_file::Value::U32(32)))).is_ok());
        for bad in [
            gguf_file::Value::U32(0),
            gguf_file::Value::U32(24),
            gguf_file::Value::U64(32),
        ] {
            let bytes = write(bad);
            let err = check(&mut Cursor::new(&bytes)).unwrap_err().to_string();
            assert!(err.contains("general.alignment"), "{err}");
        }
        let mut bytes = file(&[("a.weight", GgmlDType::F32)]);
        let at = bytes.windows(8).position(|w| w == b"a.weight").unwrap() + 8 + 4;
        bytes[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        let err = check(&mut Cursor::new(&bytes)).unwrap_err().to_string();
        assert!(err.contains("declares"), "{err}");
    }

    #[test]
    fn hostile_headers_end_in_errors() {
        let bytes = file(&[("a.weight", GgmlDType::Q8_0)]);
        for cut in [0, 3, 10, 30, 60] {
            assert!(
                tensor_types(&mut Cursor::new(&bytes[..cut])).is_err(),
                "cut {cut}"
            );
        }
        let mut huge = bytes.clone();
        huge[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(tensor_types(&mut Cursor::new(&huge)).is_err());
        let mut huge = bytes;
        // The first key's length.
        huge[24..32].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
        assert!(tensor_types(&mut Cursor::new(&huge)).is_err());
    }

    /// A model file with one tensor in a format tiller cannot run is refused at load in one
    /// line naming the tensor, the format and the fix: a type candle's reader does not know
    /// (IQ4_XS) and one it knows but tiller's kernels do not run (Q2_K).
    #[test]
    fn models_with_unsupported_formats_are_refused_at_load() {
        use crate::testing::{write_tiny_gguf, TinyArch, TinySpec};
        let dir = tempfile::tempdir().unwrap();
        let spec = TinySpec::of(TinyArch::Llama);
        let path = write_tiny_gguf(dir.path(), &spec, GgmlDType::Q8_0).unwrap();
        let good = std::fs::read(&path).unwrap();
        let tensor = "blk.1.ffn_down.weight";
        for (id, format) in [(23, "IQ4_XS"), (10, "Q2_K")] {
            let mut bytes = good.clone();
            retype(&mut bytes, tensor, id);
            std::fs::write(&path, &bytes).unwrap();
            let err = crate::model::Model::load(&path, None, &Default::default())
                .err()
                .map(|e| format!("{e:#}"))
                .unwrap();
            assert!(
                err.contains(&format!("`{tensor}` is stored as {format}")),
                "{err}"
            );
            assert!(
                err.contains("llama-quantize") && !err.contains('\n'),
                "{err}"
            );
        }
    }
}
