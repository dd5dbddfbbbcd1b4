//! `x @ W^T` for weight matrices as the files store them.
//!
//! Most formats go to candle's `QMatMul`. On the CPU, candle 0.11 multiplies Q4_1, Q5_0 and Q5_1
//! weights with scalar code against activations rounded to 8 bits; for SmolLM2-135M's Q4_1 file
//! that rounding is enough to turn "Paris" into nonsense, and the scalar loop spends most of
//! decode time. [`BlockMatmul`] keeps those weights in their blocks and multiplies them with the
//! f32 activations as they are, vectorised and spread over threads. Each output element is
//! summed in one fixed order, whatever the batch size, so a sequence gets the same numbers in a
//! batch as alone.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use half::f16;
use rayon::prelude::*;

/// Values per block in every format handled here.
const QK: usize = 32;
/// Weight rows dequantized together, so each activation row is read once per tile.
const TILE: usize = 4;
/// Roughly the weights one parallel task handles; smaller matrices stay on one thread.
const TASK_WEIGHTS: usize = 1 << 16;

/// A weight matrix ready for `forward(x) = x @ W^T`.
#[derive(Debug, Clone)]
pub enum Matmul {
    Candle(QMatMul),
    Blocks(Arc<BlockMatmul>),
}

impl Matmul {
    /// Picks [`BlockMatmul`] for the formats it covers on the CPU, candle's `QMatMul` otherwise.
    pub fn from_qtensor(q: Arc<QTensor>) -> candle_core::Result<Self> {
        match (Format::of(q.dtype()), q.device()) {
            (Some(format), Device::Cpu) => {
                Ok(Self::Blocks(Arc::new(BlockMatmul::new(format, &q)?)))
            }
            _ => Ok(Self::Candle(QMatMul::from_arc(q)?)),
        }
    }

    pub fn dense(w: Tensor) -> Self {
        Self::Candle(QMatMul::Tensor(w))
    }
}

impl Module for Matmul {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Candle(m) => m.forward(x),
            Self::Blocks(m) => m.forward(x),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
}

impl Format {
    fn of(dtype: GgmlDType) -> Option<Self> {
        match dtype {
            GgmlDType::Q4_0 => Some(Self::Q4_0),
            GgmlDType::Q4_1 => Some(Self::Q4_1),
            GgmlDType::Q5_0 => Some(Self::Q5_0),
            GgmlDType::Q5_1 => Some(Self::Q5_1),
            GgmlDType::Q8_0 => Some(Self::Q8_0),
            _ => None,
        }
    }

    /// ggml's block layouts: f16 scale, f16 minimum (`_1` formats), 32 high bits (Q5), nibbles
    /// (Q4, Q5) or bytes (Q8).
    fn block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
            Self::Q8_0 => 34,
        }
    }

    /// Writes the 32 values of one block as ggml dequantizes them: nibble `j` of byte `j` is
    /// value `j`, its high nibble value `j + 16`; Q5 adds bit `j` of `qh` as the fifth bit of
    /// value `j`; `_0` formats centre the integers, `_1` formats add the block's minimum.
    #[inline(always)]
    fn decode(self, b: &[u8], out: &mut [f32]) {
        let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
        let half = |b: &[u8]| f16::from_le_bytes([b[0], b[1]]).to_f32();
        match self {
            Self::Q8_0 => {
                for (o, &q) in out[..QK].iter_mut().zip(&b[2..34]) {
                    *o = q as i8 as f32 * d;
                }
            }
            Self::Q4_0 => nibbles(&b[2..18], 0, |q| (q as i32 - 8) as f32 * d, out),
            Self::Q4_1 => {
                let m = half(&b[2..]);
                nibbles(&b[4..20], 0, |q| q as f32 * d + m, out)
            }
            Self::Q5_0 => {
                let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
                nibbles(&b[6..22], qh, |q| (q as i32 - 16) as f32 * d, out)
            }
            Self::Q5_1 => {
                let m = half(&b[2..]);
                let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
                nibbles(&b[8..24], qh, |q| q as f32 * d + m, out)
            }
        }
    }
}

/// The 32 integers of a 4-bit block (with fifth bits from `qh`; 0 for Q4) through `value`.
#[inline(always)]
fn nibbles(qs: &[u8], qh: u32, value: impl Fn(u32) -> f32, out: &mut [f32]) {
    for j in 0..QK / 2 {
        let lo = (qs[j] & 0x0F) as u32 | ((qh >> j) << 4) & 0x10;
        let hi = (qs[j] >> 4) as u32 | (qh >> (j + 12)) & 0x10;
        out[j] = value(lo);
        out[j + QK / 2] = value(hi);
    }
}

/// Block-quantized `[n, k]` weights multiplied without rounding the activations.
#[derive(Debug)]
pub struct BlockMatmul {
    format: Format,
    data: Vec<u8>,
    n: usize,
    k: usize,
}

impl BlockMatmul {
    fn new(format: Format, q: &QTensor) -> candle_core::Result<Self> {
        let (n, k) = q.shape().dims2()?;
        if k % QK != 0 {
            candle_core::bail!(
                "a {format:?} matrix needs rows of whole {QK}-value blocks, got {k}"
            );
        }
        let data = q.data()?.into_owned();
        if data.len() != n * k / QK * format.block_bytes() {
            candle_core::bail!(
                "{format:?} [{n}, {k}] holds {} bytes, not {}",
                data.len(),
                n * k / QK * format.block_bytes()
            );
        }
        Ok(Self { format, data, n, k })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dims = x.dims();
        let Some((&k, batch)) = dims.split_last() else {
            candle_core::bail!("matmul of a scalar")
        };
        if k != self.k {
            candle_core::bail!(
                "matmul: input has {k} columns, the {:?} weight [{}, {}] needs {}",
                self.format,
                self.n,
                self.k,
                self.k
            );
        }
        let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let m = xs.len() / k;
        let mut shape = batch.to_vec();
        shape.push(self.n);
        if m == 0 {
            return Tensor::zeros(shape, x.dtype(), x.device());
        }
        let mut y = vec![0f32; m * self.n];
        // Output columns (weight rows) in tiles; each task writes its tiles transposed into
        // `cols` ([rows][m]) and the result is transposed once at the end.
        let rows_per_task = (TASK_WEIGHTS / k).max(1).div_ceil(TILE) * TILE;
        let mut cols = vec![0f32; m * self.n];
        let run = |(t, out): (usize, &mut [f32])| {
            let first = t * rows_per_task;
            self.rows(first, out.len() / m, &xs, m, out);
        };
        if self.n * self.k <= TASK_WEIGHTS {
            run((0, &mut cols[..]));
        } else {
            cols.par_chunks_mut(rows_per_task * m)
                .enumerate()
                .for_each(run);
        }
        for (row, c) in cols.chunks_exact(m).enumerate() {
            for (r, v) in c.iter().enumerate() {
                y[r * self.n + row] = *v;
            }
        }
        Tensor::from_vec(y, shape, x.device())?.to_dtype(x.dtype())
    }

    /// Weight rows `first..first + count` against every activation row; `out[row][r]`.
    fn rows(&self, first: usize, count: usize, xs: &[f32], m: usize, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { self.rows_avx2(first, count, xs, m, out) };
        }
        self.rows_with::<{ cfg!(target_arch = "aarch64") }>(first, count, xs, m, out)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn rows_avx2(&self, first: usize, count: usize, xs: &[f32], m: usize, out: &mut [f32]) {
        self.rows_with::<true>(first, count, xs, m, out)
    }

    /// `FMA`: fuse multiply and add (only where the CPU does it in one instruction; elsewhere
    /// `mul_add` would be a slow library call).
    #[inline(always)]
    fn rows_with<const FMA: bool>(
        &self,
        first: usize,
        count: usize,
        xs: &[f32],
        m: usize,
        out: &mut [f32],
    ) {
        let k = self.k;
        let row_bytes = k / QK * self.format.block_bytes();
        let mut w = vec![0f32; TILE * k];
        let mut row = 0;
        while row < count {
            let tile = TILE.min(count - row);
            for (i, wr) in w.chunks_exact_mut(k).take(tile).enumerate() {
                let bytes = &self.data[(first + row + i) * row_bytes..][..row_bytes];
                for (b, o) in bytes
                    .chunks_exact(self.format.block_bytes())
                    .zip(wr.chunks_exact_mut(QK))
                {
                    self.format.decode(b, o);
                }
            }
            for r in 0..m {
                let x = &xs[r * k..(r + 1) * k];
                for i in 0..tile {
                    out[(row + i) * m + r] = dot::<FMA>(&w[i * k..(i + 1) * k], x);
                }
            }
            row += tile;
        }
    }
}

/// `a · b` for lengths that are multiples of 16 (whole blocks), always summed in the same order.
/// `FMA`: the CPU fuses multiply and add in vector registers (see [`BlockMatmul::rows`]).
#[inline(always)]
fn dot<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    debug_assert!(a.len() == b.len() && a.len().is_multiple_of(16));
    #[cfg(target_arch = "x86_64")]
    if FMA {
        // SAFETY: `FMA` is true on x86-64 only on the path `rows` takes after detecting AVX2 and
        // FMA; the loads stay within the equal, 16-multiple lengths.
        return unsafe { dot_avx2(a, b) };
    }
    // Eight running sums, which the compiler keeps in vector registers.
    let mut acc = [0f32; 8];
    for (ca, cb) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        for i in 0..8 {
            acc[i] = if FMA {
                ca[i].mul_add(cb[i], acc[i])
            } else {
                acc[i] + ca[i] * cb[i]
            };
        }
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

/// Two 8-lane accumulators: left to itself the compiler split the sums into shuffled 4-lane
/// halves and spent most of decode time shuffling.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc0 = _mm256_setzero_ps();
    let mut acc1 = _mm256_setzero_ps();
    for i in (0..a.len()).step_by(16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
        acc1 = _mm256_fmadd_ps(
            _mm256_loadu_ps(pa.add(i + 8)),
            _mm256_loadu_ps(pb.add(i + 8)),
            acc1,
        );
    }
    let acc = _mm256_add_ps(acc0, acc1);
    let quad = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps::<1>(acc));
    let pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
    _mm_cvtss_f32(_mm_add_ss(pair, _mm_movehdup_ps(pair)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(dtype: GgmlDType) {
        let dev = Device::Cpu;
        let (n, k) = (70, 256);
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        let q = Arc::new(QTensor::quantize(&w, dtype).unwrap());
        let exact = q.dequantize(&dev).unwrap();
        let mm = Matmul::from_qtensor(q).unwrap();
        assert!(
            matches!(mm, Matmul::Blocks(_)),
            "{dtype:?} should use BlockMatmul"
        );
        let x = (Tensor::randn(0f32, 1.0, (2, 3, k), &dev).unwrap() * 50.0).unwrap();
        let got = mm.forward(&x).unwrap();
        assert_eq!(got.dims(), &[2, 3, n]);
        let want = x.broadcast_matmul(&exact.t().unwrap()).unwrap();
        let err = (&got - &want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let scale = want
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            err <= 1e-5 * scale,
            "{dtype:?}: max error {err} vs max value {scale}"
        );

        // A row alone gives exactly its numbers within the batch.
        let one = x.get(1).unwrap().get(2).unwrap().unsqueeze(0).unwrap();
        let alone = mm
            .forward(&one)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let batched = got
            .get(1)
            .unwrap()
            .get(2)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(alone, batched);
    }

    #[test]
    fn q4_1_matches_dequantized() {
        check(GgmlDType::Q4_1);
    }

    #[test]
    fn q5_0_matches_dequantized() {
        check(GgmlDType::Q5_0);
    }

    #[test]
    fn q4_0_matches_dequantized() {
        check(GgmlDType::Q4_0);
    }

    #[test]
    fn q8_0_matches_dequantized() {
        check(GgmlDType::Q8_0);
    }

    #[test]
    fn q5_1_matches_dequantized() {
        check(GgmlDType::Q5_1);
    }

    #[test]
    fn no_rows_give_no_rows() {
        let q = QTensor::quantize(
            &Tensor::ones((4, 64), DType::F32, &Device::Cpu).unwrap(),
            GgmlDType::Q4_1,
        )
        .unwrap();
        let mm = Matmul::from_qtensor(Arc::new(q)).unwrap();
        let y = mm
            .forward(&Tensor::zeros((0, 64), DType::F32, &Device::Cpu).unwrap())
            .unwrap();
        assert_eq!(y.dims(), &[0, 4]);
    }

    #[test]
    fn wrong_width_is_an_error() {
        let q = QTensor::quantize(
            &Tensor::zeros((4, 64), DType::F32, &Device::Cpu).unwrap(),
            GgmlDType::Q4_1,
        )
        .unwrap();
        let mm = Matmul::from_qtensor(Arc::new(q)).unwrap();
        let err = mm
            .forward(&Tensor::zeros((1, 32), DType::F32, &Device::Cpu).unwrap())
            .unwrap_err();
        assert!(err.to_string().contains("needs 64"), "{err}");
    }
}
