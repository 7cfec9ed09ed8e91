//! S1: clicks -> chosen slice and its in-plane points (`AddGuidanceFromPointsd`, 2D mode).

use super::DeepgrowError;

/// Which list a click came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClickKind {
    Foreground,
    Background,
}

impl std::fmt::Display for ClickKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ClickKind::Foreground => "foreground",
            ClickKind::Background => "background",
        })
    }
}

/// Raw clicks as the request gave them: `[i, j, k]` voxel indices (i the fastest axis of the
/// file, k the slice axis). They may be fractional (OHIF sends floats).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Clicks {
    pub foreground: Vec<[f64; 3]>,
    pub background: Vec<[f64; 3]>,
    /// The slice to segment (Slicer sends it); without it the lowest clicked slice is used.
    pub slice: Option<i64>,
}

/// S1 result: the chosen slice and its clicks, truncated to integers, as `[i, j]` in the
/// original voxel grid (before resampling).
#[derive(Debug, Clone, PartialEq)]
pub struct SliceGuidance {
    pub slice: usize,
    pub foreground: Vec<[i64; 2]>,
    pub background: Vec<[i64; 2]>,
}

/// S1. `shape` is the volume's `[H, W, D]` = `[size_i, size_j, size_k]`.
///
/// Decisions (spec section 10): no clicks at all, a non-finite coordinate, or any click (of
/// either kind, on any slice) whose truncated index lies outside the volume is rejected rather
/// than wrapped or clamped. Without `slice`, the lowest k among all clicks wins; with `slice`,
/// it must be inside the volume and carry at least one click. Clicks on other slices are dropped.
/// A slice with only background clicks is valid (empty positive channel).
pub fn choose_slice(clicks: &Clicks, shape: [usize; 3]) -> Result<SliceGuidance, DeepgrowError> {
    if clicks.foreground.is_empty() && clicks.background.is_empty() {
        return Err(DeepgrowError::NoClicks);
    }
    let fg = truncate_all(&clicks.foreground, ClickKind::Foreground, shape)?;
    let bg = truncate_all(&clicks.background, ClickKind::Background, shape)?;

    let lowest = fg.iter().chain(&bg).map(|p| p[2]).min();
    let slice = match clicks.slice {
        Some(s) => {
            if s < 0 || s >= shape[2] as i64 {
                return Err(DeepgrowError::SliceOutOfRange {
                    slice: s,
                    depth: shape[2],
                });
            }
            let s = s as usize;
            if !fg.iter().chain(&bg).any(|p| p[2] == s) {
                return Err(DeepgrowError::NoClickOnSlice { slice: s });
            }
            s
        }
        // Non-empty by the check above.
        None => lowest.ok_or(DeepgrowError::NoClicks)?,
    };

    let on_slice = |pts: &[[usize; 3]]| -> Vec<[i64; 2]> {
        pts.iter()
            .filter(|p| p[2] == slice)
            .map(|p| [p[0] as i64, p[1] as i64])
            .collect()
    };
    Ok(SliceGuidance {
        slice,
        foreground: on_slice(&fg),
        background: on_slice(&bg),
    })
}

/// Truncates toward zero (numpy `astype(int)`) and checks every axis against the volume.
fn truncate_all(
    points: &[[f64; 3]],
    kind: ClickKind,
    shape: [usize; 3],
) -> Result<Vec<[usize; 3]>, DeepgrowError> {
    points
        .iter()
        .enumerate()
        .map(|(index, &point)| {
            if point.iter().any(|c| !c.is_finite()) {
                return Err(DeepgrowError::NonFiniteClick { kind, index, point });
            }
            let mut out = [0usize; 3];
            for axis in 0..3 {
                let t = point[axis].trunc();
                // `t < size` in f64 is exact for any realistic size and avoids overflow.
                if t < 0.0 || t >= shape[axis] as f64 {
                    return Err(DeepgrowError::ClickOutOfRange {
                        kind,
                        index,
                        point,
                        shape,
                    });
                }
                out[axis] = t as usize;
            }
            Ok(out)
        })
        .collect()
}

/// `trunc(p * f64(to / from))` per axis: S1 step 5 (original -> resampled grid) and S6
/// (crop -> model grid). The factor is a float64 division of the two sizes, as numpy does.
pub fn scale_points(points: &[[i64; 2]], from: [usize; 2], to: [usize; 2]) -> Vec<[i64; 2]> {
    let factor = [to[0] as f64 / from[0] as f64, to[1] as f64 / from[1] as f64];
    points
        .iter()
        .map(|p| {
            [
                (p[0] as f64 * factor[0]).trunc() as i64,
                (p[1] as f64 * factor[1]).trunc() as i64,
            ]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clicks(fg: &[[f64; 3]], bg: &[[f64; 3]], slice: Option<i64>) -> Clicks {
        Clicks {
            foreground: fg.to_vec(),
            background: bg.to_vec(),
            slice,
        }
    }

    const SHAPE: [usize; 3] = [512, 400, 12];

    #[test]
    fn no_clicks_is_rejected() {
        assert_eq!(
            choose_slice(&clicks(&[], &[], None), SHAPE),
            Err(DeepgrowError::NoClicks)
        );
        assert_eq!(
            choose_slice(&clicks(&[], &[], Some(3)), SHAPE),
            Err(DeepgrowError::NoClicks)
        );
    }

    #[test]
    fn lowest_slice_wins_and_other_slices_are_dropped() {
        let g = choose_slice(
            &clicks(
                &[[10.0, 20.0, 7.0], [30.0, 40.0, 5.0]],
                &[[1.0, 2.0, 5.0], [3.0, 4.0, 9.0]],
                None,
            ),
            SHAPE,
        )
        .unwrap();
        assert_eq!(
            g,
            SliceGuidance {
                slice: 5,
                foreground: vec![[30, 40]],
                background: vec![[1, 2]],
            }
        );
    }

    #[test]
    fn lowest_slice_counts_background_clicks_too() {
        let g = choose_slice(
            &clicks(&[[10.0, 20.0, 7.0]], &[[1.0, 2.0, 2.0]], None),
            SHAPE,
        )
        .unwrap();
        assert_eq!(g.slice, 2);
        assert!(g.foreground.is_empty());
        assert_eq!(g.background, vec![[1, 2]]);
    }

    #[test]
    fn explicit_slice_overrides_lowest() {
        let g = choose_slice(
            &clicks(&[[10.0, 20.0, 7.0], [30.0, 40.0, 5.0]], &[], Some(7)),
            SHAPE,
        )
        .unwrap();
        assert_eq!(g.slice, 7);
        assert_eq!(g.foreground, vec![[10, 20]]);
    }

    #[test]
    fn explicit_slice_without_click_is_rejected() {
        assert_eq!(
            choose_slice(&clicks(&[[10.0, 20.0, 7.0]], &[], Some(6)), SHAPE),
            Err(DeepgrowError::NoClickOnSlice { slice: 6 })
        );
    }

    #[test]
    fn explicit_slice_out_of_range_is_rejected() {
        for s in [-1, 12, i64::MAX, i64::MIN] {
            assert_eq!(
                choose_slice(&clicks(&[[10.0, 20.0, 7.0]], &[], Some(s)), SHAPE),
                Err(DeepgrowError::SliceOutOfRange {
                    slice: s,
                    depth: 12
                })
            );
        }
    }

    #[test]
    fn fractional_clicks_truncate_toward_zero() {
        let g = choose_slice(
            &clicks(&[[250.7, -0.5, 3.9]], &[[511.99, 399.5, 3.0]], None),
            SHAPE,
        )
        .unwrap();
        assert_eq!(g.slice, 3);
        assert_eq!(g.foreground, vec![[250, 0]]);
        assert_eq!(g.background, vec![[511, 399]]);
    }

    #[test]
    fn out_of_range_clicks_are_rejected_on_any_axis_and_slice() {
        let cases: [([f64; 3], ClickKind); 7] = [
            ([-1.0, 0.0, 0.0], ClickKind::Foreground),
            ([0.0, -1.0, 0.0], ClickKind::Foreground),
            ([0.0, 0.0, -1.0], ClickKind::Foreground),
            ([512.0, 0.0, 0.0], ClickKind::Background),
            ([0.0, 400.0, 0.0], ClickKind::Background),
            ([0.0, 0.0, 12.0], ClickKind::Background),
            ([1e300, 0.0, 0.0], ClickKind::Foreground),
        ];
        for (p, kind) in cases {
            let c = match kind {
                // The bad click is on another slice than the good one: still rejected.
                ClickKind::Foreground => clicks(&[[1.0, 1.0, 1.0], p], &[], None),
                ClickKind::Background => clicks(&[[1.0, 1.0, 1.0]], &[p], None),
            };
            let index = usize::from(kind == ClickKind::Foreground);
            assert_eq!(
                choose_slice(&c, SHAPE),
                Err(DeepgrowError::ClickOutOfRange {
                    kind,
                    index,
                    point: p,
                    shape: SHAPE
                }),
                "{p:?}"
            );
        }
    }

    #[test]
    fn non_finite_clicks_are_rejected() {
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let p = [1.0, bad, 1.0];
            let err = choose_slice(&clicks(&[[2.0, 2.0, 2.0]], &[p], None), SHAPE);
            assert!(
                matches!(
                    err,
                    Err(DeepgrowError::NonFiniteClick {
                        kind: ClickKind::Background,
                        index: 0,
                        point
                    }) if point[0] == 1.0 && point[2] == 1.0
                ),
                "{err:?}"
            );
        }
    }

    #[test]
    fn empty_volume_rejects_every_click() {
        assert!(matches!(
            choose_slice(&clicks(&[[0.0, 0.0, 0.0]], &[], None), [0, 10, 10]),
            Err(DeepgrowError::ClickOutOfRange { .. })
        ));
    }

    #[test]
    fn scale_matches_spec_examples() {
        // Spec section 5 A: 512 -> 359.
        assert_eq!(
            scale_points(
                &[[250, 260], [270, 300], [100, 100]],
                [512, 512],
                [359, 359]
            ),
            vec![[175, 182], [189, 210], [70, 70]]
        );
        // Spec section 5 B: 300 x 280 -> 219 x 227.
        assert_eq!(
            scale_points(&[[290, 270], [250, 250]], [300, 280], [219, 227]),
            vec![[211, 218], [182, 202]]
        );
    }
}
