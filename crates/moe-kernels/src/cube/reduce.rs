//! Reductions over a cube's units through shared memory, for the row kernels.

use cubecl::prelude::*;

/// The sum of `value` over the cube's first `count` units (`count` a power of two, at most the
/// cube's size), through `shared` (`count` entries) as a tree; every unit of the cube gets it,
/// so every unit must call it. The stride grows from a literal: cubecl keeps a variable made
/// from a constant immutable.
#[cube]
#[allow(clippy::manual_is_multiple_of)] // the cube macro expands operators, not `is_multiple_of`
pub(crate) fn cube_sum(shared: &mut SharedMemory<f32>, value: f32, unit: usize, #[comptime] count: usize) -> f32 {
    if unit < count {
        shared[unit] = value;
    }
    sync_cube();
    let mut stride = 1usize;
    while stride < count {
        if unit % (2 * stride) == 0 && unit < count {
            let other = shared[unit + stride];
            shared[unit] += other;
        }
        sync_cube();
        stride *= 2;
    }
    shared[0]
}

/// [`cube_sum`]'s tree with the maximum in place of the sum.
#[cube]
#[allow(clippy::manual_is_multiple_of)] // the cube macro expands operators, not `is_multiple_of`
pub(crate) fn cube_max(shared: &mut SharedMemory<f32>, value: f32, unit: usize, #[comptime] count: usize) -> f32 {
    if unit < count {
        shared[unit] = value;
    }
    sync_cube();
    let mut stride = 1usize;
    while stride < count {
        if unit % (2 * stride) == 0 && unit < count {
            let other = shared[unit + stride];
            shared[unit] = f32::max(shared[unit], other);
        }
        sync_cube();
        stride *= 2;
    }
    shared[0]
}
