//! How the DICOM fuzz targets turn one input into several files (also used by tests/dicom_series.rs).

/// Cuts a fuzz input into 1 to 4 files: its first byte says how many, the next bytes where to cut the rest.
pub fn cut_files(data: &[u8]) -> Vec<&[u8]> {
    let Some((&count, rest)) = data.split_first() else {
        return Vec::new();
    };
    let count = usize::from(count % 4) + 1;
    if count == 1 || rest.len() < 2 * count {
        return vec![rest];
    }
    let (cuts, body) = rest.split_at(count - 1);
    let mut bounds: Vec<usize> = cuts
        .iter()
        .map(|&c| usize::from(c) * body.len() / 256)
        .collect();
    bounds.sort_unstable();
    let mut out = Vec::new();
    let mut start = 0;
    for end in bounds.into_iter().chain(std::iter::once(body.len())) {
        out.push(&body[start..end]);
        start = end;
    }
    out
}
