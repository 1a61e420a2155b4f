//! Weight matrices for the CPU kernels, held in the GGUF file's own block formats
//! ([`super::blocks`]): a tensor's bytes are read straight into its blocks, never converted.
//! A linear layer that stacks several tensors (q, k and v; gate and up) keeps each in its own
//! format, as a list of row ranges ([`RowBlock`]). On a machine with tile units the block
//! parts are repacked once, when loaded, into the layout of [`super::tiles`]
//! ([`WeightMatrix::for_kernels`]).

pub use super::blocks::*;
use super::tiles::TiledWeights;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{bail, Device, Result, Tensor};

/// How the weight matrices are held for the CPU kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightFormat {
    /// As the file stores them (float types as `F32`).
    Native,
    /// Every linear weight converted to `Q8_0`.
    Q8_0,
    /// Every linear weight dequantized to `f32`.
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

/// A block format the CPU kernels run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BlockFormat {
    F32,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
}

impl BlockFormat {
    /// The format of a GGUF tensor type, if the kernels run it as it is.
    pub fn of(dtype: GgmlDType) -> Option<Self> {
        Some(match dtype {
            GgmlDType::F32 => Self::F32,
            GgmlDType::Q4_0 => Self::Q4_0,
            GgmlDType::Q4_1 => Self::Q4_1,
            GgmlDType::Q5_0 => Self::Q5_0,
            GgmlDType::Q5_1 => Self::Q5_1,
            GgmlDType::Q8_0 => Self::Q8_0,
            GgmlDType::Q4K => Self::Q4K,
            GgmlDType::Q5K => Self::Q5K,
            GgmlDType::Q6K => Self::Q6K,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Q4_0 => "q4_0",
            Self::Q4_1 => "q4_1",
            Self::Q5_0 => "q5_0",
            Self::Q5_1 => "q5_1",
            Self::Q8_0 => "q8_0",
            Self::Q4K => "q4_k",
            Self::Q5K => "q5_k",
            Self::Q6K => "q6_k",
        }
    }

    /// Activation values sharing one 16-bit scale in a product with this format: a K-quant
    /// super-block (whose integer sub-block scales let it be summed in integers), else a block.
    pub fn activation_block(self) -> usize {
        match self {
            Self::Q4K | Self::Q5K | Self::Q6K => QK_K,
            _ => QK,
        }
    }

    /// Values per block.
    pub fn block_elems(self) -> usize {
        match self {
            Self::F32 => 1,
            Self::Q4K | Self::Q5K | Self::Q6K => QK_K,
            _ => QK,
        }
    }
}

/// The blocks of some rows of a weight matrix, row-major.
#[derive(Debug, Clone)]
pub enum WeightData {
    F32(Vec<f32>),
    Q4_0(Vec<BlockQ4_0>),
    Q4_1(Vec<BlockQ4_1>),
    Q5_0(Vec<BlockQ5_0>),
    Q5_1(Vec<BlockQ5_1>),
    Q8_0(Vec<BlockQ8_0>),
    Q4K(Vec<BlockQ4K>),
    Q5K(Vec<BlockQ5K>),
    Q6K(Vec<BlockQ6K>),
    /// Blocks of any of the formats above repacked for the tile units.
    Tiled(Box<TiledWeights>),
}

/// Applies `$body` to the block vector of a [`WeightData`] whatever its format, or
/// `$tiled` to tiled data.
macro_rules! with_blocks {
    ($data:expr, $t:ident => $tiled:expr, $v:ident => $body:expr) => {
        match $data {
            WeightData::Tiled($t) => $tiled,
            WeightData::F32($v) => $body,
            WeightData::Q4_0($v) => $body,
            WeightData::Q4_1($v) => $body,
            WeightData::Q5_0($v) => $body,
            WeightData::Q5_1($v) => $body,
            WeightData::Q8_0($v) => $body,
            WeightData::Q4K($v) => $body,
            WeightData::Q5K($v) => $body,
            WeightData::Q6K($v) => $body,
        }
    };
}

impl Dequantize for f32 {
    const ELEMS: usize = 1;
    fn dequantize(&self, out: &mut [f32]) {
        out[0] = *self;
    }
}

impl WeightData {
    pub fn format(&self) -> BlockFormat {
        match self {
            WeightData::F32(_) => BlockFormat::F32,
            WeightData::Q4_0(_) => BlockFormat::Q4_0,
            WeightData::Q4_1(_) => BlockFormat::Q4_1,
            WeightData::Q5_0(_) => BlockFormat::Q5_0,
            WeightData::Q5_1(_) => BlockFormat::Q5_1,
            WeightData::Q8_0(_) => BlockFormat::Q8_0,
            WeightData::Q4K(_) => BlockFormat::Q4K,
            WeightData::Q5K(_) => BlockFormat::Q5K,
            WeightData::Q6K(_) => BlockFormat::Q6K,
            WeightData::Tiled(t) => t.format,
        }
    }

    fn blocks(&self) -> usize {
        with_blocks!(self, t => t.rows * t.cols / t.format.block_elems(), v => v.len())
    }

    fn size_in_bytes(&self) -> usize {
        with_blocks!(self, t => t.size_in_bytes(), v => std::mem::size_of_val(v.as_slice()))
    }

    /// Reads `n` blocks of `format` from `r` straight into their final memory.
    pub fn read(format: BlockFormat, n: usize, r: &mut impl std::io::Read) -> Result<Self> {
        Ok(match format {
            BlockFormat::F32 => WeightData::F32(read_vec(n, r)?),
            BlockFormat::Q4_0 => WeightData::Q4_0(read_vec(n, r)?),
            BlockFormat::Q4_1 => WeightData::Q4_1(read_vec(n, r)?),
            BlockFormat::Q5_0 => WeightData::Q5_0(read_vec(n, r)?),
            BlockFormat::Q5_1 => WeightData::Q5_1(read_vec(n, r)?),
            BlockFormat::Q8_0 => WeightData::Q8_0(read_vec(n, r)?),
            BlockFormat::Q4K => WeightData::Q4K(read_vec(n, r)?),
            BlockFormat::Q5K => WeightData::Q5K(read_vec(n, r)?),
            BlockFormat::Q6K => WeightData::Q6K(read_vec(n, r)?),
        })
    }
}

/// `n` values of `T`, read from `r` into a vector allocated once.
fn read_vec<T: Copy>(n: usize, r: &mut impl std::io::Read) -> Result<Vec<T>> {
    let size = std::mem::size_of::<T>();
    let bytes = n
        .checked_mul(size)
        .ok_or_else(|| candle_core::Error::Msg(format!("{n} blocks overflow")))?;
    let mut out = Vec::<T>::with_capacity(n);
    // SAFETY: `T` is a plain block of integers and halves (or an f32), valid for any bits; the
    // slice covers exactly the capacity just reserved, and the length is set only after every
    // byte has been read.
    unsafe {
        let dst = std::slice::from_raw_parts_mut(out.as_mut_ptr() as *mut u8, bytes);
        r.read_exact(dst)?;
        out.set_len(n);
    }
    Ok(out)
}

/// Consecutive rows of a weight matrix in one format.
#[derive(Debug, Clone)]
pub struct RowBlock {
    pub rows: usize,
    pub data: WeightData,
}

/// A linear layer's weight `[rows, cols]` for the CPU kernels: row ranges, each in its own
/// block format.
#[derive(Debug, Clone)]
pub struct WeightMatrix {
    pub rows: usize,
    pub cols: usize,
    pub parts: Vec<RowBlock>,
}

impl WeightMatrix {
    /// One part of `rows` rows.
    pub fn new(rows: usize, cols: usize, data: WeightData) -> Result<Self> {
        let m = Self {
            rows,
            cols,
            parts: vec![RowBlock { rows, data }],
        };
        m.check()?;
        Ok(m)
    }

    /// Converts a 2-D tensor `[rows, cols]` (a float or quantized tensor that is not read
    /// natively) to `format`: `Q8_0` when asked and the rows fit whole blocks, else f32.
    pub fn from_qtensor(t: &QTensor, format: WeightFormat) -> Result<Self> {
        let (rows, cols) = t.shape().dims2()?;
        let to_q8 = format == WeightFormat::Q8_0 && cols.is_multiple_of(QK);
        if format == WeightFormat::Native {
            if let Some(f) = BlockFormat::of(t.dtype()).filter(|f| *f != BlockFormat::F32) {
                if cols.is_multiple_of(f.block_elems()) {
                    let bytes = t.data()?;
                    let n = rows * cols / f.block_elems();
                    return Self::new(rows, cols, WeightData::read(f, n, &mut &bytes[..])?);
                }
            }
        }
        let dense = t.dequantize(&Device::Cpu)?;
        let data = if to_q8 {
            let q = QTensor::quantize(&dense, GgmlDType::Q8_0)?;
            let bytes = q.data()?;
            WeightData::read(BlockFormat::Q8_0, rows * cols / QK, &mut &bytes[..])?
        } else {
            WeightData::F32(dense.flatten_all()?.to_vec1::<f32>()?)
        };
        Self::new(rows, cols, data)
    }

    /// Stacks matrices with the same `cols` (e.g. q, k and v) into one, each part kept in its
    /// own format; nothing is copied.
    pub fn stack(parts: Vec<WeightMatrix>) -> Result<Self> {
        let Some(cols) = parts.first().map(|p| p.cols) else {
            bail!("stacking no weight matrices")
        };
        if let Some(p) = parts.iter().find(|p| p.cols != cols) {
            bail!("stacking a matrix of {} columns on one of {cols}", p.cols)
        }
        let rows = parts.iter().map(|p| p.rows).sum();
        let m = Self {
            rows,
            cols,
            parts: parts.into_iter().flat_map(|p| p.parts).collect(),
        };
        m.check()?;
        Ok(m)
    }

    fn check(&self) -> Result<()> {
        let mut rows = 0;
        for p in &self.parts {
            let per_row = self.cols / p.data.format().block_elems();
            if !self.cols.is_multiple_of(p.data.format().block_elems())
                || p.data.blocks() != p.rows * per_row
            {
                bail!(
                    "weight rows [{}, {}] in {} hold {} blocks",
                    p.rows,
                    self.cols,
                    p.data.format().name(),
                    p.data.blocks()
                )
            }
            rows += p.rows;
        }
        if rows != self.rows {
            bail!("weight parts hold {rows} rows, not {}", self.rows)
        }
        Ok(())
    }

    /// The formats of the parts, by bytes held.
    pub fn formats(&self) -> Vec<(BlockFormat, usize)> {
        self.parts
            .iter()
            .map(|p| (p.data.format(), p.data.size_in_bytes()))
            .collect()
    }

    /// The part holding row `r`, and `r`'s index in it.
    pub fn part_of(&self, mut r: usize) -> (&RowBlock, usize) {
        for p in &self.parts {
            if r < p.rows {
                return (p, r);
            }
            r -= p.rows;
        }
        let last = self.parts.last().unwrap_or_else(|| unreachable!("checked"));
        (last, last.rows)
    }

    /// Writes row `r` as floats into `out` (`cols` long).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let (part, r) = self.part_of(r);
        with_blocks!(&part.data, t => t.dequantize_row(r, out), v => dequantize_row(v, r, self.cols, out))
    }

    /// The matrix as this machine's kernels read it fastest: with tile units, every block
    /// part repacked for them (f32 parts stay); elsewhere unchanged.
    pub fn for_kernels(self) -> Self {
        if super::matmul::isa() != super::matmul::Isa::Amx {
            return self;
        }
        self.tiled()
    }

    /// Every block part repacked into the tile layout (which any machine can multiply: the
    /// portable kernel computes what the tile units do).
    pub fn tiled(mut self) -> Self {
        for p in &mut self.parts {
            if let Some(t) = TiledWeights::pack(&p.data, p.rows, self.cols) {
                p.data = WeightData::Tiled(Box::new(t));
            }
        }
        self
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
        self.parts.iter().map(|p| p.data.size_in_bytes()).sum()
    }
}

/// Row `r` of `cols` values stored as consecutive blocks of `T`.
fn dequantize_row<T: Dequantize>(blocks: &[T], r: usize, cols: usize, out: &mut [f32]) {
    let per_row = cols / T::ELEMS;
    for (b, o) in blocks[r * per_row..(r + 1) * per_row]
        .iter()
        .zip(out.chunks_mut(T::ELEMS))
    {
        b.dequantize(o);
    }
}

#[cfg(test)]
pub(crate) mod tests {

    /// Every block format the kernels run, as candle names them (the kernel tests use it too).
    pub(crate) const BLOCK_FORMATS: [GgmlDType; 8] = [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q8_0,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
    ];
    use super::*;

    /// Our reference dequantisation equals candle's (ggml's) for every format it has.
    #[test]
    fn every_format_dequantizes_like_ggml() {
        let cols = 512;
        let dense: Vec<f32> = crate::testing::pseudo_random(4 * cols, 9, 3.0);
        let t = Tensor::from_vec(dense, (4, cols), &Device::Cpu).unwrap();
        for dtype in BLOCK_FORMATS {
            let q = QTensor::quantize(&t, dtype).unwrap();
            let w = WeightMatrix::from_qtensor(&q, WeightFormat::Native).unwrap();
            assert_eq!(w.formats()[0].0, BlockFormat::of(dtype).unwrap());
            assert_eq!(w.size_in_bytes(), q.data().unwrap().len(), "{dtype:?}");
            let ours = w.to_dense(&Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
            let theirs = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            assert_eq!(ours, theirs, "{dtype:?}");
        }
    }

    #[test]
    fn stacked_parts_keep_their_formats_and_rows() {
        let a = Tensor::from_vec(
            crate::testing::pseudo_random(2 * 64, 1, 1.0),
            (2, 64),
            &Device::Cpu,
        )
        .unwrap();
        let b = Tensor::from_vec(
            crate::testing::pseudo_random(3 * 64, 2, 1.0),
            (3, 64),
            &Device::Cpu,
        )
        .unwrap();
        let qa = QTensor::quantize(&a, GgmlDType::Q5_0).unwrap();
        let qb = QTensor::quantize(&b, GgmlDType::Q8_0).unwrap();
        let w = WeightMatrix::stack(vec![
            WeightMatrix::from_qtensor(&qa, WeightFormat::Native).unwrap(),
            WeightMatrix::from_qtensor(&qb, WeightFormat::Native).unwrap(),
        ])
        .unwrap();
        assert_eq!((w.rows, w.cols, w.parts.len()), (5, 64, 2));
        let dense = w.to_dense(&Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
        let ra = qa
            .dequantize(&Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let rb = qb
            .dequantize(&Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(dense[..2], ra[..]);
        assert_eq!(dense[2..], rb[..]);
        let w8 = WeightMatrix::from_qtensor(&qa, WeightFormat::Q8_0).unwrap();
        assert_eq!(w8.formats()[0].0, BlockFormat::Q8_0);
    }
}
