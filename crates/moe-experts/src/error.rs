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
    Kernel(#[from] moe_kernels::KernelError),
}
