//! Weight matrices in the block formats our CPU kernels read.
//!
//! The layouts are ggml's (the GGUF on-disk layouts), so a GGUF tensor's bytes are used as they
//! are: `Q4_1` (4-bit with a per-block scale and minimum) and `Q8_0` (8-bit with a scale).
//! Anything else is converted at load time to one of the formats here (see [`WeightFormat`]).

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{bail, Device, Result, Tensor};
use half::f16;

/// Elements per quantization block.
pub const QK: usize = 32;

/// ggml's `block_q4_1`: `x = d * q + m`, `q` in 0..16; element `j < 16` is the low nibble of
/// `qs[j]`, element `j + 16` its high nibble.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct BlockQ4_1 {
    pub d: f16,
    pub m: f16,
    pub qs: [u8; QK / 2],
}
const _: () = assert!(std::mem::size_of::<BlockQ4_1>() == 20);

/// ggml's `block_q8_0`: `x = d * q`, `q` in -127..=127.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct BlockQ8_0 {
    pub d: f16,
    pub qs: [i8; QK],
}
const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34);

/// How a weight matrix is held for the CPU kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightFormat {
    /// Keep `Q4_1` and `Q8_0` tensors as they are; convert other quantized types to `Q8_0`
    /// and float types to `F32`.
    Native,
    /// Convert every linear weight to `Q8_0`.
    Q8_0,
    /// Dequantize every linear weight to `f32`.
    F32,
}

impl WeightFormat {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "native" => Some(Self::Native),
            "q8_0" => Some(Self::Q8_0),
            "f32" => Some(Self::F32),
            _ => None,
        }
    }
}

/// The rows of one weight matrix (`rows` outputs × `cols` inputs), row-major.
#[derive(Debug, Clone)]
pub enum WeightData {
    Q4_1(Vec<BlockQ4_1>),
    Q8_0(Vec<BlockQ8_0>),
    F32(Vec<f32>),
}

/// A linear layer's weight `[rows, cols]` in a CPU kernel format.
#[derive(Debug, Clone)]
pub struct WeightMatrix {
    pub rows: usize,
    pub cols: usize,
    pub data: WeightData,
}

fn blocks_from_bytes<T: Copy>(bytes: &[u8]) -> Result<Vec<T>> {
    let size = std::mem::size_of::<T>();
    if !bytes.len().is_multiple_of(size) {
        bail!(
            "{} bytes is not a whole number of {size}-byte blocks",
            bytes.len()
        )
    }
    let n = bytes.len() / size;
    let mut out = Vec::<T>::with_capacity(n);
    // SAFETY: `T` is a `repr(C)` block of plain integers and halves with no padding and no
    // invalid bit patterns; we copy exactly `n * size` bytes into capacity reserved for `n`.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), out.as_mut_ptr() as *mut u8, n * size);
        out.set_len(n);
    }
    Ok(out)
}

impl WeightMatrix {
    /// Converts a 2-D tensor `[rows, cols]` from a checkpoint into the requested format.
    pub fn from_qtensor(t: &QTensor, format: WeightFormat) -> Result<Self> {
        let (rows, cols) = t.shape().dims2()?;
        let quantizable = cols.is_multiple_of(QK);
        let target = match (format, t.dtype()) {
            (WeightFormat::F32, _) => GgmlDType::F32,
            (_, _) if !quantizable => GgmlDType::F32,
            (WeightFormat::Q8_0, _) => GgmlDType::Q8_0,
            (WeightFormat::Native, GgmlDType::Q4_1 | GgmlDType::Q8_0) => t.dtype(),
            (WeightFormat::Native, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) => {
                GgmlDType::F32
            }
            (WeightFormat::Native, _) => GgmlDType::Q8_0,
        };
        let data = match target {
            GgmlDType::Q4_1 if t.dtype() == GgmlDType::Q4_1 => {
                WeightData::Q4_1(blocks_from_bytes(&t.data()?)?)
            }
            GgmlDType::Q8_0 if t.dtype() == GgmlDType::Q8_0 => {
                WeightData::Q8_0(blocks_from_bytes(&t.data()?)?)
            }
            GgmlDType::Q8_0 => {
                let dense = t.dequantize(&Device::Cpu)?;
                let q = QTensor::quantize(&dense, GgmlDType::Q8_0)?;
                WeightData::Q8_0(blocks_from_bytes(&q.data()?)?)
            }
            _ => {
                let dense = t.dequantize(&Device::Cpu)?;
                WeightData::F32(dense.flatten_all()?.to_vec1::<f32>()?)
            }
        };
        let m = Self { rows, cols, data };
        m.check()?;
        Ok(m)
    }

    /// Stacks matrices with the same `cols` and format into one (e.g. q, k and v).
    pub fn concat_rows(parts: &[WeightMatrix]) -> Result<Self> {
        let Some(first) = parts.first() else {
            bail!("concat_rows of nothing")
        };
        let cols = first.cols;
        let rows = parts.iter().map(|p| p.rows).sum();
        let mut data = match &first.data {
            WeightData::Q4_1(_) => WeightData::Q4_1(Vec::new()),
            WeightData::Q8_0(_) => WeightData::Q8_0(Vec::new()),
            WeightData::F32(_) => WeightData::F32(Vec::new()),
        };
        for p in parts {
            if p.cols != cols {
                bail!("concat_rows: {} columns after {cols}", p.cols)
            }
            match (&mut data, &p.data) {
                (WeightData::Q4_1(d), WeightData::Q4_1(s)) => d.extend_from_slice(s),
                (WeightData::Q8_0(d), WeightData::Q8_0(s)) => d.extend_from_slice(s),
                (WeightData::F32(d), WeightData::F32(s)) => d.extend_from_slice(s),
                _ => bail!("concat_rows: mixed weight formats"),
            }
        }
        let m = Self { rows, cols, data };
        m.check()?;
        Ok(m)
    }

    fn check(&self) -> Result<()> {
        let (len, per_row) = match &self.data {
            WeightData::Q4_1(b) => (b.len(), self.cols / QK),
            WeightData::Q8_0(b) => (b.len(), self.cols / QK),
            WeightData::F32(v) => (v.len(), self.cols),
        };
        if len != self.rows * per_row {
            bail!(
                "weight matrix [{}, {}] holds {len} elements or blocks",
                self.rows,
                self.cols
            )
        }
        Ok(())
    }

    pub fn format_name(&self) -> &'static str {
        match self.data {
            WeightData::Q4_1(_) => "q4_1",
            WeightData::Q8_0(_) => "q8_0",
            WeightData::F32(_) => "f32",
        }
    }

    /// Writes row `r` as floats into `out` (`cols` long).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let cols = self.cols;
        match &self.data {
            WeightData::F32(v) => out.copy_from_slice(&v[r * cols..(r + 1) * cols]),
            WeightData::Q8_0(b) => {
                let nb = cols / QK;
                for (i, blk) in b[r * nb..(r + 1) * nb].iter().enumerate() {
                    let d = blk.d.to_f32();
                    for j in 0..QK {
                        out[i * QK + j] = d * blk.qs[j] as f32;
                    }
                }
            }
            WeightData::Q4_1(b) => {
                let nb = cols / QK;
                for (i, blk) in b[r * nb..(r + 1) * nb].iter().enumerate() {
                    let (d, m) = (blk.d.to_f32(), blk.m.to_f32());
                    for j in 0..QK / 2 {
                        out[i * QK + j] = d * (blk.qs[j] & 0x0F) as f32 + m;
                        out[i * QK + j + QK / 2] = d * (blk.qs[j] >> 4) as f32 + m;
                    }
                }
            }
        }
    }

    /// The whole matrix as an f32 tensor `[rows, cols]` (for the reference path and tests).
    pub fn to_dense(&self, device: &Device) -> Result<Tensor> {
        let mut v = vec![0f32; self.rows * self.cols];
        for (r, row) in v.chunks_mut(self.cols).enumerate() {
            self.dequantize_row(r, row);
        }
        Tensor::from_vec(v, (self.rows, self.cols), device)
    }

    pub fn size_in_bytes(&self) -> usize {
        match &self.data {
            WeightData::Q4_1(b) => b.len() * std::mem::size_of::<BlockQ4_1>(),
            WeightData::Q8_0(b) => b.len() * std::mem::size_of::<BlockQ8_0>(),
            WeightData::F32(v) => v.len() * 4,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_qtensor_keeps_q4_1_bytes_and_dequantizes_like_candle() -> Result<()> {
        let dense: Vec<f32> = (0..4 * 64)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.1)
            .collect();
        let t = Tensor::from_vec(dense, (4, 64), &Device::Cpu)?;
        let q = QTensor::quantize(&t, GgmlDType::Q4_1)?;
        let w = WeightMatrix::from_qtensor(&q, WeightFormat::Native)?;
        assert_eq!(w.format_name(), "q4_1");
        let ours = w.to_dense(&Device::Cpu)?.to_vec2::<f32>()?;
        let theirs = q.dequantize(&Device::Cpu)?.to_vec2::<f32>()?;
        assert_eq!(ours, theirs);
        let w8 = WeightMatrix::from_qtensor(&q, WeightFormat::Q8_0)?;
        assert_eq!(w8.format_name(), "q8_0");
        Ok(())
    }
}
