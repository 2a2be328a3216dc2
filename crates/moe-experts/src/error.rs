use thiserror::Error;

/// Why an MoE layer could not be built or run.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum MoeError {
    /// The router configuration is impossible.
    #[error("router config: {0}")]
    Router(#[from] moe_router::RouterConfigError),
    /// A layer setting is out of range.
    #[error("{field} = {value} is invalid: expected {expected}")]
    Setting {
        /// The field.
        field: &'static str,
        /// What was given.
        value: String,
        /// What is allowed.
        expected: &'static str,
    },
    /// The input's last dimension is not the layer's width.
    #[error("input width {got} does not match the layer's d_model {expected}")]
    InputWidth {
        /// d_model.
        expected: usize,
        /// The input's last dimension.
        got: usize,
    },
    /// The routing could not be dispatched.
    #[error("dispatch: {0}")]
    Plan(#[from] moe_kernels::PlanError),
}

/// Why an HF checkpoint's MoE keys or tensors could not be loaded ([`crate::hf`],
/// [`crate::safetensors_source`]); names the key or tensor at fault.
#[derive(Debug, Error)]
pub enum LoadError {
    /// `config.json` is not valid JSON for this model.
    #[error("config.json: {0}")]
    ConfigJson(#[from] serde_json::Error),
    /// A config key holds a value this crate does not support.
    #[error("config.json key `{key}` = {value} is not supported: expected {expected}")]
    Unsupported {
        /// The key.
        key: &'static str,
        /// Its value.
        value: String,
        /// What is supported.
        expected: &'static str,
    },
    /// The safetensors file is malformed or truncated.
    #[error("safetensors: {0}")]
    Safetensors(#[from] safetensors::SafeTensorError),
    /// A tensor the layer needs is absent.
    #[error("tensor `{0}` is missing from the checkpoint")]
    Missing(String),
    /// A tensor has the wrong shape.
    #[error("tensor `{name}` has shape {got:?}, expected {expected:?}")]
    Shape {
        /// The tensor.
        name: String,
        /// Its shape.
        got: Vec<usize>,
        /// The shape the config implies.
        expected: Vec<usize>,
    },
    /// A tensor has a dtype other than f32, bf16 or f16.
    #[error("tensor `{name}` has dtype {dtype}, expected F32, BF16 or F16")]
    Dtype {
        /// The tensor.
        name: String,
        /// Its dtype.
        dtype: String,
    },
    /// The configuration the checkpoint implies is invalid.
    #[error(transparent)]
    Layer(#[from] MoeError),
}
