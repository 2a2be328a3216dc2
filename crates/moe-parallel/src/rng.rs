//! A small seeded generator, so simulations repeat exactly for a seed on every platform.

/// SplitMix64 (Steele, Lea, Flood 2014): 64-bit state, passes BigCrush, and is enough for
/// sampling routing decisions. Not for cryptography.
#[derive(Debug, Clone)]
pub(crate) struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator whose stream depends only on `seed`.
    pub(crate) fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// The next 64 random bits.
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in the open interval (0, 1): never 0, so `ln` of it is finite.
    pub(crate) fn open01(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// A standard Gumbel sample, `-ln(-ln u)`.
    pub(crate) fn gumbel(&mut self) -> f64 {
        -(-self.open01().ln()).ln()
    }

    /// Uniform in `0..n` (`n >= 1`), by rejection so that every value is equally likely.
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        let zone = u64::MAX - u64::MAX % n;
        loop {
            let x = self.next_u64();
            if x < zone {
                return x % n;
            }
        }
    }

    /// Shuffles `items` in place (Fisher-Yates).
    pub(crate) fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_stream_and_moments() {
        // First outputs for seed 0 from the reference C implementation.
        let mut r = SplitMix64::new(0);
        assert_eq!(r.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(r.next_u64(), 0x6E78_9E6A_A1B9_65F4);
        let n = 200_000;
        let mean = (0..n).map(|_| r.open01()).sum::<f64>() / n as f64;
        assert!((mean - 0.5).abs() < 0.005, "{mean}");
        // Gumbel mean is the Euler-Mascheroni constant.
        let g = (0..n).map(|_| r.gumbel()).sum::<f64>() / n as f64;
        assert!((g - 0.577_215_66).abs() < 0.02, "{g}");
        let mut counts = [0u32; 3];
        (0..30_000).for_each(|_| counts[r.below(3) as usize] += 1);
        assert!(counts.iter().all(|&c| (9_500..10_500).contains(&c)), "{counts:?}");
    }
}
