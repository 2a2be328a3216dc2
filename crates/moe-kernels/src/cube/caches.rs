//! Where cubecl keeps compiled kernels and autotune results for a program that may start in
//! any directory. cubecl's default puts both in the `target/` of the first `Cargo.toml` above
//! the working directory (the user's cache directory when there is none), so the same program
//! started elsewhere compiles and tunes everything again, which costs minutes on CUDA.

use std::path::Path;

use cubecl::config::cache::CacheConfig;
use cubecl::config::{CubeClRuntimeConfig, RuntimeConfig};

/// Keeps cubecl's compiled kernels and autotune results in `dir`, whatever the working
/// directory. The rest of the configuration is read as cubecl reads it (a `cubecl.toml` above
/// the working directory, then the `CUBECL_*` variables). Call it before the first GPU
/// operation: once cubecl has read its configuration it cannot change, and this returns
/// `false` having changed nothing.
pub fn keep_kernel_caches_in(dir: &Path) -> bool {
    if CubeClRuntimeConfig::storage().lock().is_some() {
        return false;
    }
    let mut config = CubeClRuntimeConfig::from_current_dir().override_from_env();
    config.compilation.cache = Some(CacheConfig::File(dir.to_path_buf()));
    config.autotune.cache = CacheConfig::File(dir.to_path_buf());
    CubeClRuntimeConfig::set(config);
    true
}
