//! Messages as tensor data, so that they can cross a thread or process boundary through a
//! tensor transfer service (host copies; the autodiff graph does not follow them).

use burn::tensor::{Tensor, TensorData, backend::Backend};

use super::{CombineMessage, DispatchMessage, EpError, Message};

/// A [`Message`] that travels as a fixed number of [`TensorData`] parts (fixed per type, so
/// that a receiver knows how many to fetch). An absent tensor travels as a zero-length part.
pub trait WireMessage<B: Backend>: Message + Sized {
    /// Parts per message.
    const PARTS: usize;

    /// The message's parts, read to the host.
    fn into_wire(self) -> Vec<TensorData>;

    /// The message back from its parts, on `device`.
    fn from_wire(parts: Vec<TensorData>, device: &B::Device) -> Result<Self, EpError>;
}

/// A zero-length part standing for an absent tensor.
fn empty_part() -> TensorData {
    TensorData::new(Vec::<f32>::new(), [0])
}

/// `Some(tensor)` unless the part is zero-length; a part of the wrong rank is an error.
fn tensor_of<B: Backend, const D: usize>(
    part: TensorData,
    device: &B::Device,
) -> Result<Option<Tensor<B, D>>, EpError> {
    if part.shape.num_elements() == 0 {
        return Ok(None);
    }
    if part.shape.num_dims() != D {
        return Err(EpError::WirePart { dims: part.shape.to_vec(), rank: D });
    }
    Ok(Some(Tensor::from_data(part, device)))
}

/// Checks the part count.
fn expect_parts(parts: &[TensorData], expected: usize) -> Result<(), EpError> {
    if parts.len() != expected {
        return Err(EpError::WireParts { got: parts.len(), expected });
    }
    Ok(())
}

impl<B: Backend> WireMessage<B> for DispatchMessage<B> {
    /// Rows `[n, d]`, weights `[p]`, pairs `[p, 2]` as ints.
    const PARTS: usize = 3;

    fn into_wire(self) -> Vec<TensorData> {
        let (Some(rows), Some(weights)) = (self.rows, self.weights) else {
            return vec![empty_part(), empty_part(), empty_part()];
        };
        let pairs: Vec<i64> = self.pairs.iter().flat_map(|&(row, expert)| [row as i64, expert as i64]).collect();
        let count = self.pairs.len();
        vec![rows.into_data(), weights.into_data(), TensorData::new(pairs, [count, 2])]
    }

    fn from_wire(mut parts: Vec<TensorData>, device: &B::Device) -> Result<Self, EpError> {
        expect_parts(&parts, 3)?;
        let pairs_part = parts.pop().unwrap_or_else(empty_part);
        let weights = tensor_of::<B, 1>(parts.pop().unwrap_or_else(empty_part), device)?;
        let rows = tensor_of::<B, 2>(parts.pop().unwrap_or_else(empty_part), device)?;
        let flat: Vec<i64> = pairs_part.iter::<i64>().collect();
        let pairs = flat.chunks_exact(2).map(|p| (p[0] as usize, p[1] as usize)).collect();
        Ok(Self { rows, pairs, weights })
    }
}

impl<B: Backend> WireMessage<B> for CombineMessage<B> {
    /// Rows `[n, d]`.
    const PARTS: usize = 1;

    fn into_wire(self) -> Vec<TensorData> {
        vec![self.rows.map_or_else(empty_part, Tensor::into_data)]
    }

    fn from_wire(mut parts: Vec<TensorData>, device: &B::Device) -> Result<Self, EpError> {
        expect_parts(&parts, 1)?;
        Ok(Self { rows: tensor_of::<B, 2>(parts.pop().unwrap_or_else(empty_part), device)? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    type B = NdArray;

    #[test]
    fn messages_survive_the_round_trip() {
        let device = Default::default();
        let rows = Tensor::<B, 2>::from_floats([[1.0, 2.0], [3.0, 4.0]], &device);
        let weights = Tensor::<B, 1>::from_floats([0.5, 0.25, 0.125], &device);
        let message = DispatchMessage { rows: Some(rows), pairs: vec![(0, 1), (1, 0), (1, 3)], weights: Some(weights) };
        let back = DispatchMessage::<B>::from_wire(message.into_wire(), &device).unwrap();
        assert_eq!(back.pairs, vec![(0, 1), (1, 0), (1, 3)]);
        assert_eq!(back.rows.unwrap().into_data().to_vec::<f32>().unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
        assert_eq!(back.weights.unwrap().into_data().to_vec::<f32>().unwrap(), vec![0.5, 0.25, 0.125]);
        let empty = DispatchMessage::<B> { rows: None, pairs: Vec::new(), weights: None };
        let back = DispatchMessage::<B>::from_wire(empty.into_wire(), &device).unwrap();
        assert!(back.rows.is_none() && back.weights.is_none() && back.pairs.is_empty());
        assert!(
            CombineMessage::<B>::from_wire(CombineMessage::<B> { rows: None }.into_wire(), &device)
                .unwrap()
                .rows
                .is_none()
        );
        assert_eq!(
            CombineMessage::<B>::from_wire(vec![], &device).unwrap_err(),
            EpError::WireParts { got: 0, expected: 1 }
        );
    }
}
