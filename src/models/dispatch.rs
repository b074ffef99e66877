//! Run-time dispatch from generic model code (`B: Backend`) to code written for one concrete
//! backend type: rfstudio's own ops (`kernels.rs`: the cubecl GroupNorm kernel on `Cuda`, `Wgpu`,
//! `Vulkan`; `autodiff_ops.rs`: memory-efficient backward passes on `Autodiff<..>`) keep the models
//! free of extra trait bounds by checking `TypeId`s and moving values through `Box<dyn Any>`.

use std::any::{Any, TypeId};

/// Runs `f` when `B` is exactly `T`. `InB` / `OutB` are `f`'s input / output types with `B` in
/// place of `T` (so that they are the same types once `B == T`); the values move through
/// `Box<dyn Any>`. `Err` gives the input back: when `B` is not `T`, when `InB` is not `InT`, or
/// when `f` declines (returns its input). An `OutB` that is not `OutT` is a programming error.
pub(crate) fn via<B: 'static, T: 'static, InB: 'static, OutB: 'static, InT: 'static, OutT: 'static>(
    input: InB,
    f: impl FnOnce(InT) -> Result<OutT, InT>,
) -> Result<OutB, InB> {
    if TypeId::of::<B>() != TypeId::of::<T>() {
        return Err(input);
    }
    let boxed: Box<dyn Any> = Box::new(input);
    let input = match boxed.downcast::<InT>() {
        Ok(input) => *input,
        Err(boxed) => return Err(back(boxed)),
    };
    match f(input) {
        Ok(out) => Ok(back(Box::new(out))),
        Err(input) => Err(back(Box::new(input))),
    }
}

/// The `V` in a `Box<dyn Any>`: [`via`] unboxes the caller's own input, or `f`'s input or output
/// as `InB` / `OutB`, which `B == T` made the same types.
fn back<V: 'static>(boxed: Box<dyn Any>) -> V {
    match boxed.downcast::<V>() {
        Ok(v) => *v,
        Err(_) => unreachable!("dispatch::via: a value changed type across a downcast"),
    }
}

#[cfg(test)]
mod tests {
    use super::via;

    #[test]
    fn via_runs_only_for_the_same_type_and_gives_inputs_back() {
        let double = |x: Vec<u32>| -> Result<Vec<u32>, Vec<u32>> { Ok(x.into_iter().map(|v| v * 2).collect()) };
        // Same type: runs.
        assert_eq!(via::<u8, u8, Vec<u32>, Vec<u32>, Vec<u32>, Vec<u32>>(vec![1, 2], double), Ok(vec![2, 4]));
        // Another type: the input comes back untouched.
        assert_eq!(via::<u8, u16, Vec<u32>, Vec<u32>, Vec<u32>, Vec<u32>>(vec![1, 2], double), Err(vec![1, 2]));
        // `f` declines: its input comes back.
        let decline = |x: Vec<u32>| -> Result<Vec<u32>, Vec<u32>> { Err(x) };
        assert_eq!(via::<u8, u8, Vec<u32>, Vec<u32>, Vec<u32>, Vec<u32>>(vec![3], decline), Err(vec![3]));
        // Mismatched input types: given back, not run.
        let on_strings = |x: String| -> Result<String, String> { Ok(x) };
        assert_eq!(via::<u8, u8, Vec<u32>, String, String, String>(vec![5], on_strings), Err(vec![5]));
    }
}
