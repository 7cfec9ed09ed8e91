//! Cheap indexed access to a 2D view in any memory layout, without per-pixel `ndarray` indexing.

use ndarray::{ArrayView2, Axis};
use std::borrow::Cow;

/// A `(rows, cols)` plane over a flat buffer: element `(r, c)` is `data[r * rs + c * cs]`.
pub(crate) struct Plane<'a> {
    data: Cow<'a, [f32]>,
    rs: usize,
    cs: usize,
}

impl<'a> Plane<'a> {
    /// Borrows contiguous views in any axis order (row-major, or the transposed column-major view
    /// the server takes from a NIfTI volume); copies anything else once, in logical order.
    pub(crate) fn new(view: ArrayView2<'a, f32>) -> Plane<'a> {
        let (rows, cols) = view.dim();
        let strides = view.strides();
        // With non-negative strides the memory-order slice starts at element (0, 0).
        if strides.iter().all(|&s| s >= 0) {
            let (rs, cs) = (
                if rows > 1 { strides[0] as usize } else { 0 },
                if cols > 1 { strides[1] as usize } else { 0 },
            );
            if let Some(data) = view.to_slice_memory_order() {
                return Plane {
                    data: Cow::Borrowed(data),
                    rs,
                    cs,
                };
            }
        }
        let data: Vec<f32> = view
            .axis_iter(Axis(0))
            .flat_map(|row| row.into_iter().copied())
            .collect();
        Plane {
            data: Cow::Owned(data),
            rs: cols,
            cs: 1,
        }
    }

    #[inline(always)]
    pub(crate) fn get(&self, r: usize, c: usize) -> f32 {
        self.data[r * self.rs + c * self.cs]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{s, Array2, ShapeBuilder};

    #[test]
    fn all_layouts_read_the_same() {
        let a = Array2::from_shape_fn((5, 7), |(r, c)| (r * 10 + c) as f32);
        let f = Array2::from_shape_fn((5, 7).f(), |(r, c)| (r * 10 + c) as f32);
        let big = Array2::from_shape_fn((12, 15), |(r, c)| (r * 10 + c) as f32);
        let strided = big.slice(s![..;2, 1..;2]);
        let reversed = a.slice(s![..;-1, ..]);
        let single_row = a.slice(s![2..3, ..]);
        let single_col = f.slice(s![.., 3..4]);
        for v in [
            a.view(),
            f.view(),
            strided,
            reversed,
            single_row,
            single_col,
            a.t().t(),
        ] {
            let p = Plane::new(v);
            for ((r, c), &x) in v.indexed_iter() {
                assert_eq!(p.get(r, c), x);
            }
        }
    }
}
