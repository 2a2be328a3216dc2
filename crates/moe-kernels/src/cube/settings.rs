//! Every `MOE_*` environment setting of the cube kernels, read once per process into one
//! [`Settings`]. The settings are for measurements and tuning: a bad value changes speed, never
//! results, so it is reported once on stderr and the default kept.

use std::sync::OnceLock;

use super::flush::FlushPolicy;

/// The cube kernels' settings of this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// `MOE_KERNELS=portable` turns the kernels off: the cube backends then run the portable
    /// burn-op path of every method and plan the layout it needs (`DispatchLayout::Padded`,
    /// see `MoeBackend::layout`), the before/after of the benches. On otherwise.
    pub kernels: bool,
    /// The grouped GEMM's output tile per cube and block per plane on the tensor-core path,
    /// `((rows, columns), (rows, columns))`: `MOE_GEMM_TILE=MxN` (M, N in 32, 64, 128, 256) and
    /// `MOE_GEMM_WARP=MxN` (16, 32 or 64, dividing the tile; at most 8 planes); 128x128 tiles of
    /// 64x64 plane blocks otherwise.
    pub gemm_tile: ((usize, usize), (usize, usize)),
    /// The pipelined GEMM's reduction depth per step and steps in flight: `MOE_GEMM_PIPE=DxS`
    /// (D in 16, 32, 64; S in 2..=4); 64 deep, 2 in flight otherwise (the best of a sweep on
    /// the H200).
    pub gemm_pipeline: (usize, usize),
    /// `MOE_FLUSH=off|fusion|all`: which queues a kernel launch hands on; `all` by default.
    pub flush: FlushPolicy,
    /// `MOE_WGMMA=off` runs the cube GEMMs where Hopper's `wgmma` kernel would; on otherwise.
    pub wgmma: bool,
}

const DEFAULT_TILE: ((usize, usize), (usize, usize)) = ((128, 128), (64, 64));
const DEFAULT_PIPELINE: (usize, usize) = (64, 2);

/// This process's settings, read from the environment on first use.
pub fn settings() -> &'static Settings {
    static SETTINGS: OnceLock<Settings> = OnceLock::new();
    SETTINGS.get_or_init(|| {
        let (settings, complaints) = Settings::parse(|name| std::env::var(name).ok());
        for complaint in complaints {
            eprintln!("{complaint}");
        }
        settings
    })
}

/// Whether the cube backends run their kernels ([`Settings::kernels`]).
pub fn kernels_enabled() -> bool {
    settings().kernels
}

impl Settings {
    /// The settings from `var` (a variable's value, `None` when unset), and one line per bad
    /// value saying which default replaced it.
    pub fn parse(var: impl Fn(&str) -> Option<String>) -> (Self, Vec<String>) {
        let mut complaints = Vec::new();
        let kernels = var("MOE_KERNELS").is_none_or(|v| v != "portable");
        let gemm_tile = match (var("MOE_GEMM_TILE"), var("MOE_GEMM_WARP")) {
            (None, None) => DEFAULT_TILE,
            (tile, warp) => gemm_tile(tile.as_deref(), warp.as_deref()).unwrap_or_else(|| {
                complaints.push(
                    "MOE_GEMM_TILE / MOE_GEMM_WARP must be MxN with the tile in 32, 64, 128, 256 and the warp in 16, \
                     32, 64 dividing it, at most 8 planes; using 128x128 / 64x64"
                        .to_string(),
                );
                DEFAULT_TILE
            }),
        };
        let gemm_pipeline = match var("MOE_GEMM_PIPE") {
            None => DEFAULT_PIPELINE,
            Some(v) => match pair(&v) {
                Some((d, s)) if [16, 32, 64].contains(&d) && (2..=4).contains(&s) => (d, s),
                _ => {
                    complaints.push("MOE_GEMM_PIPE must be DxS with D in 16, 32, 64 and S in 2..=4; using 64x2".into());
                    DEFAULT_PIPELINE
                }
            },
        };
        let flush = match var("MOE_FLUSH").as_deref() {
            None | Some("all") => FlushPolicy::All,
            Some("fusion") => FlushPolicy::Fusion,
            Some("off") => FlushPolicy::Off,
            Some(other) => {
                complaints.push(format!("MOE_FLUSH must be off, fusion or all (got {other:?}); using all"));
                FlushPolicy::All
            }
        };
        let wgmma = var("MOE_WGMMA").is_none_or(|v| v != "off");
        (Self { kernels, gemm_tile, gemm_pipeline, flush, wgmma }, complaints)
    }
}

/// `MxN` as two numbers.
fn pair(value: &str) -> Option<(usize, usize)> {
    let (m, n) = value.split_once('x')?;
    Some((m.parse().ok()?, n.parse().ok()?))
}

/// The tile and plane block from `MOE_GEMM_TILE` and `MOE_GEMM_WARP` (either may be unset),
/// or `None` when a set one is malformed or the two do not fit together.
fn gemm_tile(tile: Option<&str>, warp: Option<&str>) -> Option<((usize, usize), (usize, usize))> {
    let tile = tile.map_or(Some(DEFAULT_TILE.0), pair)?;
    let default_warp = (tile.0.min(DEFAULT_TILE.1.0), tile.1.min(DEFAULT_TILE.1.1));
    let warp = warp.map_or(Some(default_warp), pair)?;
    let tile_ok = |v: usize| [32, 64, 128, 256].contains(&v);
    let warp_ok = |v: usize, t: usize| [16, 32, 64].contains(&v) && t.is_multiple_of(v);
    let planes = (tile.0 / warp.0) * (tile.1 / warp.1);
    (tile_ok(tile.0) && tile_ok(tile.1) && warp_ok(warp.0, tile.0) && warp_ok(warp.1, tile.1) && planes <= 8)
        .then_some((tile, warp))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(vars: &[(&str, &str)]) -> (Settings, usize) {
        let (settings, complaints) =
            Settings::parse(|name| vars.iter().find(|(n, _)| *n == name).map(|(_, v)| v.to_string()));
        (settings, complaints.len())
    }

    #[test]
    fn unset_variables_give_the_defaults() {
        let (settings, complaints) = parse(&[]);
        let expected = Settings {
            kernels: true,
            gemm_tile: DEFAULT_TILE,
            gemm_pipeline: DEFAULT_PIPELINE,
            flush: FlushPolicy::All,
            wgmma: true,
        };
        assert_eq!((settings, complaints), (expected, 0));
    }

    #[test]
    fn each_variable_sets_its_field() {
        // (variable, value, the field as read back, expected, complaints)
        type Case = (&'static str, &'static str, fn(&Settings) -> String, &'static str, usize);
        let cases: &[Case] = &[
            ("MOE_KERNELS", "portable", |s| s.kernels.to_string(), "false", 0),
            ("MOE_KERNELS", "on", |s| s.kernels.to_string(), "true", 0),
            ("MOE_GEMM_TILE", "64x128", |s| format!("{:?}", s.gemm_tile), "((64, 128), (64, 64))", 0),
            ("MOE_GEMM_TILE", "48x128", |s| format!("{:?}", s.gemm_tile), "((128, 128), (64, 64))", 1),
            // 16 planes of 32x32 in a 128x128 tile: more than 8.
            ("MOE_GEMM_WARP", "32x32", |s| format!("{:?}", s.gemm_tile), "((128, 128), (64, 64))", 1),
            ("MOE_GEMM_PIPE", "32x3", |s| format!("{:?}", s.gemm_pipeline), "(32, 3)", 0),
            ("MOE_GEMM_PIPE", "32x9", |s| format!("{:?}", s.gemm_pipeline), "(64, 2)", 1),
            ("MOE_FLUSH", "fusion", |s| format!("{:?}", s.flush), "Fusion", 0),
            ("MOE_FLUSH", "sometimes", |s| format!("{:?}", s.flush), "All", 1),
            ("MOE_WGMMA", "off", |s| s.wgmma.to_string(), "false", 0),
        ];
        for (name, value, field, expected, complaints) in cases {
            let (settings, got) = parse(&[(name, value)]);
            assert_eq!((field(&settings), got), (expected.to_string(), *complaints), "{name}={value}");
        }
    }
}
