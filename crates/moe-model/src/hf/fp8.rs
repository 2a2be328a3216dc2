//! FP8 E4M3 weights with per-block scales, as in DeepSeek-V3's released checkpoint: a weight
//! `[rows, cols]` stored as `float8_e4m3fn` and `weight_scale_inv` `[ceil(rows / br),
//! ceil(cols / bc)]`; the real weight is `fp8 * scale` for the block holding each element.

/// The value of one `float8_e4m3fn` byte: 1 sign bit, 4 exponent bits (bias 7), 3 mantissa
/// bits; no infinities, and `S.1111.111` is NaN.
pub fn e4m3_to_f32(byte: u8) -> f32 {
    let sign = if byte & 0x80 != 0 { -1.0 } else { 1.0 };
    let exponent = i32::from((byte >> 3) & 0x0f);
    let mantissa = f32::from(byte & 0x07);
    if exponent == 0x0f && byte & 0x07 == 0x07 {
        return f32::NAN;
    }
    let magnitude = if exponent == 0 {
        // Subnormal: no implicit leading one.
        mantissa / 8.0 * 2f32.powi(-6)
    } else {
        (1.0 + mantissa / 8.0) * 2f32.powi(exponent - 7)
    };
    sign * magnitude
}

/// Scale-grid shape for a `[rows, cols]` weight in blocks of `block`.
pub fn scale_shape(rows: usize, cols: usize, block: [usize; 2]) -> [usize; 2] {
    [rows.div_ceil(block[0]), cols.div_ceil(block[1])]
}

/// Dequantizes `bytes` (`rows * cols` E4M3 values, row-major) with `scales`
/// ([`scale_shape`], row-major) to f32.
pub fn dequantize(bytes: &[u8], rows: usize, cols: usize, scales: &[f32], block: [usize; 2]) -> Vec<f32> {
    let table: Vec<f32> = (0..=255u8).map(e4m3_to_f32).collect();
    let scale_cols = cols.div_ceil(block[1]);
    let mut out = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        let scale_row = &scales[(r / block[0]) * scale_cols..][..scale_cols];
        out.extend(
            bytes[r * cols..][..cols].iter().enumerate().map(|(c, &b)| table[usize::from(b)] * scale_row[c / block[1]]),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values from the OCP 8-bit floating point specification (E4M3 column).
    #[test]
    fn e4m3_known_values() {
        for (byte, value) in [
            (0x00, 0.0),
            (0x38, 1.0),
            (0xb8, -1.0),
            (0x3c, 1.5),
            (0x40, 2.0),
            (0x7e, 448.0),
            (0xfe, -448.0),
            (0x08, 2f32.powi(-6)),
            (0x01, 2f32.powi(-9)),
            (0x07, 7.0 * 2f32.powi(-9)),
        ] {
            assert_eq!(e4m3_to_f32(byte), value, "{byte:#04x}");
        }
        assert!(e4m3_to_f32(0x7f).is_nan() && e4m3_to_f32(0xff).is_nan());
    }
}
