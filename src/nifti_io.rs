//! NIfTI-1 decoding and mask encoding.
//!
//! The `nifti` crate parses the 348-byte header (both byte orders); the voxel data is converted here into a
//! typed buffer kept in its stored datatype, so that a session holds about the file's voxel bytes and only the
//! clicked slice is ever converted to `f32`. The mask written back reuses the input's raw header bytes, so its
//! geometry (dims, pixdim, qform, sform and their codes) is the input's, byte for byte.

use std::io::Read;

use std::io::BufReader;
use std::sync::OnceLock;

use bytes::Bytes;
use flate2::bufread;
use flate2::Compression;
use ndarray::{Array2, ArrayView2};
use nifti::{Endianness, NiftiHeader};

const HEADER_SIZE: usize = 348;
/// Header plus the 4-byte extension flag: where voxel data starts in a single-file `.nii` without extensions.
const MIN_SINGLE_FILE_OFFSET: usize = 352;

/// Writes a number's bytes into a buffer at an offset, in the given byte order.
macro_rules! put_ordered {
    ($buffer:expr, $at:expr, $value:expr, $big_endian:expr) => {{
        let bytes = if $big_endian {
            $value.to_be_bytes()
        } else {
            $value.to_le_bytes()
        };
        $buffer[$at..$at + bytes.len()].copy_from_slice(&bytes);
    }};
}
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// Why an uploaded file could not be used as a volume. Every variant is the client's problem (4xx).
#[derive(Debug, thiserror::Error)]
pub enum NiftiError {
    #[error("the uploaded file is not a NIfTI-1 file ({0})")]
    NotNifti(String),
    #[error("NIfTI-2 files are not supported; save the volume as NIfTI-1 (.nii or .nii.gz), as every viewer does by default")]
    Nifti2,
    #[error("the uploaded file is a header-only NIfTI (.hdr/.img pair); upload a single-file .nii or .nii.gz")]
    HeaderOnly,
    #[error("the gzip stream could not be decompressed: {0}")]
    BadGzip(String),
    #[error("the decompressed volume exceeds the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("the NIfTI header is invalid: {0}")]
    BadHeader(String),
    #[error("the volume is not a 3D scalar volume: {0}")]
    NotScalar3d(String),
    #[error("the NIfTI datatype {0} is not supported")]
    UnsupportedDatatype(String),
    #[error("the upload could not be read to its end: {0}")]
    Read(String),
    #[error("the gzip stream goes on past the {image} bytes of image its header describes (more than {allowance} bytes more): it is not that volume")]
    TrailingData { image: u64, allowance: u64 },
    #[error("the file is truncated: the header promises {expected} bytes of voxel data after offset {offset}, but only {available} are present")]
    Truncated {
        expected: u64,
        offset: u64,
        available: u64,
    },
}

/// Voxel values in the datatype they were stored with (native byte order).
#[derive(Debug, Clone, PartialEq)]
pub enum VoxelData {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F32(Vec<f32>),
    F64(Vec<f64>),
}

/// Applies `value * slope + inter` as nibabel does (its header hands slope and intercept over as Python floats,
/// so every datatype is scaled in `f64`), then casts to `f32` as MONAI's loader does.
trait ToScaledF32: Copy {
    fn to_scaled_f32(self, scaling: Option<Scaling>) -> f32;
}

macro_rules! scaled_f32 {
    ($($ty:ty),*) => {$(
        impl ToScaledF32 for $ty {
            #[inline]
            fn to_scaled_f32(self, scaling: Option<Scaling>) -> f32 {
                match scaling {
                    None => self as f32,
                    Some(Scaling { slope, inter }) => {
                        let mut value = self as f64 * slope as f64;
                        if inter != 0.0 {
                            value += inter as f64;
                        }
                        value as f32
                    }
                }
            }
        }
    )*};
}
scaled_f32!(u8, i8, u16, i16, u32, i32, u64, i64, f32, f64);

/// Dispatches a generic body over the typed buffer of a [`VoxelData`].
macro_rules! with_voxels {
    ($data:expr, $values:ident => $body:expr) => {
        match $data {
            VoxelData::U8($values) => $body,
            VoxelData::I8($values) => $body,
            VoxelData::U16($values) => $body,
            VoxelData::I16($values) => $body,
            VoxelData::U32($values) => $body,
            VoxelData::I32($values) => $body,
            VoxelData::U64($values) => $body,
            VoxelData::I64($values) => $body,
            VoxelData::F32($values) => $body,
            VoxelData::F64($values) => $body,
        }
    };
}

impl VoxelData {
    pub fn len(&self) -> usize {
        with_voxels!(self, values => values.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held in memory.
    pub fn byte_size(&self) -> usize {
        with_voxels!(self, values => std::mem::size_of_val(values.as_slice()))
    }

    pub fn datatype_name(&self) -> &'static str {
        match self {
            VoxelData::U8(_) => "uint8",
            VoxelData::I8(_) => "int8",
            VoxelData::U16(_) => "uint16",
            VoxelData::I16(_) => "int16",
            VoxelData::U32(_) => "uint32",
            VoxelData::I32(_) => "int32",
            VoxelData::U64(_) => "uint64",
            VoxelData::I64(_) => "int64",
            VoxelData::F32(_) => "float32",
            VoxelData::F64(_) => "float64",
        }
    }
}

/// nibabel's read scaling: applied only when the slope is non-zero and finite, and not the identity.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scaling {
    pub slope: f32,
    pub inter: f32,
}

/// Where the volume sits in the world, and the raw header it came with.
#[derive(Debug, Clone, PartialEq)]
pub struct Geometry {
    /// [size_i, size_j, size_k]; i is the fastest-varying axis in the file.
    pub shape: [usize; 3],
    /// nibabel's best affine (sform, else qform, else the pixdim fallback), voxel index -> world mm.
    pub affine: [[f64; 4]; 4],
    /// The volume's j runs against the rows of the images it was read from (a DICOM series, stored as its
    /// NIfTI conversion is): clients address and get back voxels in the images' own order.
    pub rows_reversed: bool,
    raw_header: Box<[u8; HEADER_SIZE]>,
    endianness: Endianness,
}

impl Geometry {
    /// The geometry of a volume that came without a NIfTI header (a DICOM series): a little-endian NIfTI-1
    /// header with this shape and affine as both its sform and (for the rotation part, which must be
    /// orthonormal) its qform, both "scanner" coded, so that masks written for it carry the same world
    /// geometry. `datatype` and `bitpix` are the NIfTI codes of the stored voxels.
    pub fn from_affine(
        shape: [usize; 3],
        affine: [[f64; 4]; 4],
        datatype: i16,
        bitpix: i16,
    ) -> Geometry {
        let mut header = Box::new([0u8; HEADER_SIZE]);
        put_ordered!(header, 0, HEADER_SIZE as i32, false);
        let dims = [3, shape[0], shape[1], shape[2], 1, 1, 1, 1];
        for (n, d) in dims.iter().enumerate() {
            let d = i16::try_from(*d).unwrap_or(i16::MAX);
            put_ordered!(header, 40 + 2 * n, d, false);
        }
        put_ordered!(header, 70, datatype, false);
        put_ordered!(header, 72, bitpix, false);
        let column = |c: usize| [affine[0][c], affine[1][c], affine[2][c]];
        let norm = |v: [f64; 3]| (v[0] * v[0] + v[1] * v[1] + v[2] * v[2]).sqrt();
        let spacing = [norm(column(0)), norm(column(1)), norm(column(2))];
        let (quaternion, qfac) = rotation_quaternion(&affine, spacing);
        put_ordered!(header, 76, qfac as f32, false);
        for (n, s) in spacing.iter().enumerate() {
            put_ordered!(header, 80 + 4 * n, *s as f32, false);
        }
        put_ordered!(header, 108, MIN_SINGLE_FILE_OFFSET as f32, false);
        put_ordered!(header, 112, 1.0f32, false); // scl_slope: the voxels are stored as they are meant
        header[123] = 2; // xyzt_units: millimetres
        put_ordered!(header, 252, 1i16, false); // qform_code: scanner
        put_ordered!(header, 254, 1i16, false); // sform_code: scanner
        for (n, q) in quaternion.iter().enumerate() {
            put_ordered!(header, 256 + 4 * n, *q as f32, false);
        }
        for axis in 0..3 {
            put_ordered!(header, 268 + 4 * axis, affine[axis][3] as f32, false); // qoffset
            for c in 0..4 {
                put_ordered!(
                    header,
                    280 + 16 * axis + 4 * c,
                    affine[axis][c] as f32,
                    false
                );
            }
        }
        header[344..348].copy_from_slice(b"n+1\0");
        Geometry {
            shape,
            affine,
            rows_reversed: false,
            raw_header: header,
            endianness: Endianness::Little,
        }
    }

    /// The geometry clients see: with [`Self::rows_reversed`], j runs the other way (and the affine with it).
    pub fn as_presented(&self) -> std::borrow::Cow<'_, Geometry> {
        if !self.rows_reversed {
            return std::borrow::Cow::Borrowed(self);
        }
        let mut affine = self.affine;
        let last_row = (self.shape[1].max(1) - 1) as f64;
        for row in affine.iter_mut().take(3) {
            row[3] += row[1] * last_row;
            row[1] = -row[1];
        }
        let [datatype, bitpix] =
            [70, 72].map(|at| i16::from_le_bytes([self.raw_header[at], self.raw_header[at + 1]]));
        std::borrow::Cow::Owned(Geometry::from_affine(self.shape, affine, datatype, bitpix))
    }
}

/// NIfTI's quaternion (b, c, d) and qfac of the rotation part of `affine` (nifti_mat44_to_quatern).
fn rotation_quaternion(affine: &[[f64; 4]; 4], spacing: [f64; 3]) -> ([f64; 3], f64) {
    let mut r = [[0.0f64; 3]; 3];
    for row in 0..3 {
        for c in 0..3 {
            r[row][c] = if spacing[c] > 0.0 {
                affine[row][c] / spacing[c]
            } else {
                f64::from(u8::from(row == c))
            };
        }
    }
    let determinant = r[0][0] * (r[1][1] * r[2][2] - r[1][2] * r[2][1])
        - r[0][1] * (r[1][0] * r[2][2] - r[1][2] * r[2][0])
        + r[0][2] * (r[1][0] * r[2][1] - r[1][1] * r[2][0]);
    let qfac = if determinant < 0.0 { -1.0 } else { 1.0 };
    if qfac < 0.0 {
        for row in &mut r {
            row[2] = -row[2];
        }
    }
    let trace = r[0][0] + r[1][1] + r[2][2] + 1.0;
    let (a, b, c, d);
    if trace > 0.5 {
        let root = trace.sqrt();
        a = 0.5 * root;
        b = 0.25 * (r[2][1] - r[1][2]) / a;
        c = 0.25 * (r[0][2] - r[2][0]) / a;
        d = 0.25 * (r[1][0] - r[0][1]) / a;
    } else {
        let xd = 1.0 + r[0][0] - (r[1][1] + r[2][2]);
        let yd = 1.0 + r[1][1] - (r[0][0] + r[2][2]);
        let zd = 1.0 + r[2][2] - (r[0][0] + r[1][1]);
        if xd > 1.0 {
            let bb = 0.5 * xd.sqrt();
            b = bb;
            c = 0.25 * (r[0][1] + r[1][0]) / bb;
            d = 0.25 * (r[0][2] + r[2][0]) / bb;
            a = 0.25 * (r[2][1] - r[1][2]) / bb;
        } else if yd > 1.0 {
            let cc = 0.5 * yd.sqrt();
            c = cc;
            b = 0.25 * (r[0][1] + r[1][0]) / cc;
            d = 0.25 * (r[1][2] + r[2][1]) / cc;
            a = 0.25 * (r[0][2] - r[2][0]) / cc;
        } else {
            let dd = 0.5 * zd.sqrt();
            d = dd;
            b = 0.25 * (r[0][2] + r[2][0]) / dd;
            c = 0.25 * (r[1][2] + r[2][1]) / dd;
            a = 0.25 * (r[1][0] - r[0][1]) / dd;
        }
    }
    // a >= 0 by convention: (b, c, d) then determine it
    if a < 0.0 {
        ([-b, -c, -d], qfac)
    } else {
        ([b, c, d], qfac)
    }
}

/// A decoded 3D scalar volume.
#[derive(Debug, Clone, PartialEq)]
pub struct Volume {
    pub geometry: Geometry,
    pub data: VoxelData,
    pub scaling: Option<Scaling>,
    /// Whether the upload was gzip-compressed (the reply mirrors it by default).
    pub was_compressed: bool,
}

impl Volume {
    /// Slice `k` as an (H, W) array indexed `[i, j]`, scaled to `f32` as nibabel + MONAI would.
    /// The result is a transposed view of i-fastest memory (strides (1, H)); the pipeline accepts any strides.
    pub fn slice_f32(&self, k: usize) -> Array2<f32> {
        let [h, w, d] = self.geometry.shape;
        assert!(
            k < d,
            "slice index is validated before it reaches the volume"
        );
        plane_f32(&self.data, [h, w], k, self.scaling)
    }

    /// Bytes this volume holds in memory (what a session costs).
    pub fn byte_size(&self) -> usize {
        self.data.byte_size() + HEADER_SIZE
    }

    /// The volume as an uncompressed single-file NIfTI-1 of its own header and voxels (extensions dropped),
    /// which [`decode`] reads back to an equal volume with one copy: what a shared session store holds, so
    /// that another replica gets it back without the original upload's inflating or DICOM decoding.
    /// [`Geometry::rows_reversed`] and [`Volume::was_compressed`] are not in it; the store keeps them.
    pub fn to_nifti(&self) -> Vec<u8> {
        let big_endian = self.geometry.endianness == Endianness::Big;
        let mut header = *self.geometry.raw_header;
        put_ordered!(header, 108, MIN_SINGLE_FILE_OFFSET as f32, big_endian); // vox_offset
        header[344..348].copy_from_slice(b"n+1\0");
        let mut file = Vec::with_capacity(MIN_SINGLE_FILE_OFFSET + self.data.byte_size());
        file.extend_from_slice(&header);
        file.extend_from_slice(&[0u8; MIN_SINGLE_FILE_OFFSET - HEADER_SIZE]); // no extensions
        with_voxels!(&self.data, values => {
            if big_endian == cfg!(target_endian = "big") {
                file.extend_from_slice(bytemuck::cast_slice(values.as_slice()));
            } else {
                for value in values {
                    file.extend_from_slice(&if big_endian {
                        value.to_be_bytes()
                    } else {
                        value.to_le_bytes()
                    });
                }
            }
        });
        file
    }
}

/// Plane `k` of i-fastest voxels as an (H, W) array indexed `[i, j]`, scaled to `f32` as nibabel + MONAI would.
/// The result is a transposed view of i-fastest memory (strides (1, H)); the pipeline accepts any strides.
fn plane_f32(
    data: &VoxelData,
    [h, w]: [usize; 2],
    k: usize,
    scaling: Option<Scaling>,
) -> Array2<f32> {
    let plane = h * w;
    let values: Vec<f32> = with_voxels!(data, values => values[k * plane..(k + 1) * plane]
        .iter()
        .map(|v| v.to_scaled_f32(scaling))
        .collect());
    Array2::from_shape_vec((w, h), values)
        .expect("plane length matches the shape")
        .reversed_axes()
}

/// Limits applied while decoding untrusted input.
#[derive(Debug, Clone, Copy)]
pub struct DecodeLimits {
    /// Largest decompressed file accepted, in bytes.
    pub max_decompressed_bytes: u64,
}

/// Decompressed bytes a full decode reads past the image before it calls the stream something else than the
/// volume its header describes (a few bytes of padding are common; gigabytes of zeros are a bomb).
pub const TRAILING_ALLOWANCE: u64 = 1 << 20;

/// Where a NIfTI file's bytes come from.
pub enum FileBytes<'a> {
    /// The whole file in memory (a buffered upload): a `.nii` is read in place.
    Memory(&'a [u8]),
    /// A stream (an upload as it arrives): read once, front to back, and no further than needed.
    Stream(Box<dyn Read + Send + 'a>),
}

/// Decodes a whole `.nii` or `.nii.gz` file in memory (detected by its magic bytes, not its name).
pub fn decode(bytes: &[u8], limits: DecodeLimits) -> Result<Volume, NiftiError> {
    open(FileBytes::Memory(bytes), limits)?.read_volume()
}

/// Reads and checks a NIfTI-1 header, inflating only the header of a `.nii.gz`. The voxels stay unread until
/// [`NiftiFile::read_volume`] or [`NiftiFile::read_slice`] asks for them, so what a file claims beyond its
/// header never costs memory.
pub fn open(bytes: FileBytes<'_>, limits: DecodeLimits) -> Result<NiftiFile<'_>, NiftiError> {
    let (mut body, was_compressed) = match bytes {
        FileBytes::Memory(data) if data.starts_with(&GZIP_MAGIC) => (
            Body::stream(Box::new(bufread::MultiGzDecoder::new(data)), true),
            true,
        ),
        FileBytes::Memory(data) => (Body::Memory { data, at: 0 }, false),
        FileBytes::Stream(mut reader) => {
            let mut magic = [0u8; 2];
            let got = read_full(&mut reader, &mut magic).map_err(|e| read_error(e, false))?;
            let head = std::io::Cursor::new(magic).take(got as u64);
            if magic == GZIP_MAGIC {
                let buffered = BufReader::with_capacity(1 << 16, head.chain(reader));
                (
                    Body::stream(Box::new(bufread::MultiGzDecoder::new(buffered)), true),
                    true,
                )
            } else {
                (Body::stream(Box::new(head.chain(reader)), false), false)
            }
        }
    };
    let mut raw_header = Box::new([0u8; HEADER_SIZE]);
    let got = body.read_into(&mut raw_header[..])?;
    if got < HEADER_SIZE {
        return Err(NiftiError::NotNifti(format!(
            "{got} bytes is shorter than a NIfTI-1 header"
        )));
    }
    let header = parse_header(&raw_header)?;
    let end = header.offset as u64 + header.image_bytes;
    if end > limits.max_decompressed_bytes {
        return Err(NiftiError::TooLarge {
            limit: limits.max_decompressed_bytes,
        });
    }
    Ok(NiftiFile {
        geometry: Geometry {
            shape: header.shape,
            affine: header.affine,
            rows_reversed: false,
            raw_header,
            endianness: header.endianness,
        },
        header,
        body,
        was_compressed,
    })
}

/// A NIfTI-1 file whose header has been read and checked; its voxels are read on demand, once.
pub struct NiftiFile<'a> {
    geometry: Geometry,
    header: Header,
    body: Body<'a>,
    was_compressed: bool,
}

impl NiftiFile<'_> {
    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    pub fn was_compressed(&self) -> bool {
        self.was_compressed
    }

    /// Bytes the decoded volume will hold in memory (what [`Self::read_volume`] allocates).
    pub fn volume_bytes(&self) -> u64 {
        self.header.image_bytes + HEADER_SIZE as u64
    }

    /// Reads the whole image into a buffer of exactly its size, in its stored datatype. A compressed stream
    /// that goes on for more than [`TRAILING_ALLOWANCE`] bytes past the image is refused.
    pub fn read_volume(mut self) -> Result<Volume, NiftiError> {
        let voxels = self.geometry.shape.iter().product::<usize>();
        if !self.body.skip_to(self.header.offset as u64)? {
            return Err(self.truncated());
        }
        let data = self.read_voxels(voxels)?;
        if self.was_compressed {
            let extra = self.body.skip(TRAILING_ALLOWANCE + 1)?;
            if extra > TRAILING_ALLOWANCE {
                return Err(NiftiError::TrailingData {
                    image: self.header.image_bytes,
                    allowance: TRAILING_ALLOWANCE,
                });
            }
        }
        Ok(Volume {
            geometry: self.geometry,
            data,
            scaling: self.header.scaling,
            was_compressed: self.was_compressed,
        })
    }

    /// Slice `k` as [`Volume::slice_f32`] gives it, reading (or inflating) the file no further than the end of
    /// that slice: one plane is all this holds in memory.
    pub fn read_slice(mut self, k: usize) -> Result<Array2<f32>, NiftiError> {
        let [h, w, d] = self.geometry.shape;
        assert!(k < d, "slice index is validated before it reaches the file");
        let plane = h * w;
        let plane_bytes = (plane * self.header.bytes_per_voxel) as u64;
        if !self
            .body
            .skip_to(self.header.offset as u64 + k as u64 * plane_bytes)?
        {
            return Err(self.truncated());
        }
        let data = self.read_voxels(plane)?;
        Ok(plane_f32(&data, [h, w], 0, self.header.scaling))
    }

    /// The next `count` voxels, in native byte order.
    fn read_voxels(&mut self, count: usize) -> Result<VoxelData, NiftiError> {
        let big_endian = self.header.endianness == Endianness::Big;
        macro_rules! typed {
            ($variant:ident, $ty:ty) => {{
                let mut values: Vec<$ty> = vec![<$ty>::default(); count];
                let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut values);
                let wanted = bytes.len();
                let got = self.body.read_into(bytes)?;
                if got < wanted {
                    return Err(self.truncated());
                }
                if big_endian != cfg!(target_endian = "big") {
                    values.iter_mut().for_each(|v| *v = <$ty>::byte_swapped(*v));
                }
                VoxelData::$variant(values)
            }};
        }
        Ok(match self.header.datatype {
            2 => typed!(U8, u8),
            256 => typed!(I8, i8),
            4 => typed!(I16, i16),
            512 => typed!(U16, u16),
            8 => typed!(I32, i32),
            768 => typed!(U32, u32),
            1024 => typed!(I64, i64),
            1280 => typed!(U64, u64),
            16 => typed!(F32, f32),
            64 => typed!(F64, f64),
            other => return Err(NiftiError::UnsupportedDatatype(other.to_string())),
        })
    }

    /// The error for a file that ended where the body now is.
    fn truncated(&self) -> NiftiError {
        let offset = self.header.offset as u64;
        NiftiError::Truncated {
            expected: self.header.image_bytes,
            offset,
            available: self.body.position().saturating_sub(offset),
        }
    }
}

/// A byte-swap that also serves the float types (through their bit patterns).
trait SwapBytes: Copy {
    fn byte_swapped(self) -> Self;
}

macro_rules! swap_int {
    ($($ty:ty),*) => {$(
        impl SwapBytes for $ty {
            #[inline]
            fn byte_swapped(self) -> Self {
                self.swap_bytes()
            }
        }
    )*};
}
swap_int!(u8, i8, u16, i16, u32, i32, u64, i64);

impl SwapBytes for f32 {
    #[inline]
    fn byte_swapped(self) -> Self {
        f32::from_bits(self.to_bits().swap_bytes())
    }
}

impl SwapBytes for f64 {
    #[inline]
    fn byte_swapped(self) -> Self {
        f64::from_bits(self.to_bits().swap_bytes())
    }
}

/// The file's bytes after what has been read: a slice in memory, or a reader consumed front to back.
enum Body<'a> {
    Memory {
        data: &'a [u8],
        at: usize,
    },
    Stream {
        reader: Box<dyn Read + Send + 'a>,
        /// Whether the reader inflates (its errors are the gzip stream's).
        gzip: bool,
        at: u64,
        /// Reused for skipping (the stack buffer of `io::copy` makes an inflater work in 8 KiB steps).
        scratch: Vec<u8>,
    },
}

impl<'a> Body<'a> {
    fn stream(reader: Box<dyn Read + Send + 'a>, gzip: bool) -> Self {
        Body::Stream {
            reader,
            gzip,
            at: 0,
            scratch: Vec::new(),
        }
    }

    fn position(&self) -> u64 {
        match self {
            Body::Memory { at, .. } => *at as u64,
            Body::Stream { at, .. } => *at,
        }
    }

    /// Fills `buf` from the file; fewer bytes than asked only at its end.
    fn read_into(&mut self, buf: &mut [u8]) -> Result<usize, NiftiError> {
        match self {
            Body::Memory { data, at } => {
                let n = buf.len().min(data.len() - *at);
                buf[..n].copy_from_slice(&data[*at..*at + n]);
                *at += n;
                Ok(n)
            }
            Body::Stream {
                reader, gzip, at, ..
            } => {
                let n = read_full(reader, buf).map_err(|e| read_error(e, *gzip))?;
                *at += n as u64;
                Ok(n)
            }
        }
    }

    /// Passes over up to `n` bytes without keeping them; returns how many there were.
    fn skip(&mut self, n: u64) -> Result<u64, NiftiError> {
        match self {
            Body::Memory { data, at } => {
                let skipped = n.min((data.len() - *at) as u64);
                *at += skipped as usize;
                Ok(skipped)
            }
            Body::Stream {
                reader,
                gzip,
                at,
                scratch,
            } => {
                scratch.resize(1 << 18, 0);
                let mut skipped = 0u64;
                while skipped < n {
                    let want = (n - skipped).min(scratch.len() as u64) as usize;
                    let got = read_full(reader, &mut scratch[..want])
                        .map_err(|e| read_error(e, *gzip))?;
                    skipped += got as u64;
                    if got < want {
                        break;
                    }
                }
                *at += skipped;
                Ok(skipped)
            }
        }
    }

    /// Moves to byte `position` of the file (never backwards); false when the file ends before it.
    fn skip_to(&mut self, position: u64) -> Result<bool, NiftiError> {
        let wanted = position.saturating_sub(self.position());
        Ok(self.skip(wanted)? == wanted)
    }
}

/// `read` until `buf` is full or the stream ends.
fn read_full(reader: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

fn read_error(error: std::io::Error, gzip: bool) -> NiftiError {
    if gzip {
        // a corrupt or cut stream
        NiftiError::BadGzip(error.to_string())
    } else {
        // the upload itself failed; the HTTP layer answers for it
        NiftiError::Read(error.to_string())
    }
}

/// What the decoder needs from a checked header.
struct Header {
    shape: [usize; 3],
    affine: [[f64; 4]; 4],
    endianness: Endianness,
    datatype: i16,
    bytes_per_voxel: usize,
    scaling: Option<Scaling>,
    /// Where the voxels start.
    offset: usize,
    /// Bytes of voxel data the header promises.
    image_bytes: u64,
}

fn parse_header(bytes: &[u8; HEADER_SIZE]) -> Result<Header, NiftiError> {
    let sizeof_hdr = i32::from_le_bytes(bytes[0..4].try_into().expect("4 bytes"));
    match sizeof_hdr {
        348 => {}
        540 => return Err(NiftiError::Nifti2),
        v if v.swap_bytes() == 348 => {}
        v if v.swap_bytes() == 540 => return Err(NiftiError::Nifti2),
        _ => {
            return Err(NiftiError::NotNifti(
                "the header size field is not 348".into(),
            ))
        }
    }
    // The magic first: the `nifti` crate rejects other magics (Analyze headers) with a generic message.
    match &bytes[344..348] {
        b"n+1\0" => {}
        b"ni1\0" => return Err(NiftiError::HeaderOnly),
        _ => {
            return Err(NiftiError::NotNifti(
                "the magic string is not \"n+1\"".into(),
            ))
        }
    }
    let header =
        NiftiHeader::from_reader(&bytes[..]).map_err(|e| NiftiError::BadHeader(e.to_string()))?;
    // nibabel takes the byte order from sizeof_hdr, the nifti crate from dim[0]: refuse a header where they
    // disagree rather than read it in an order nibabel would not (found by the nifti_decode fuzzer).
    let sizeof_hdr_big_endian = sizeof_hdr != 348;
    if sizeof_hdr_big_endian != (header.endianness == Endianness::Big) {
        return Err(NiftiError::BadHeader(
            "sizeof_hdr and dim[0] are stored in different byte orders".into(),
        ));
    }

    let shape = scalar_3d_shape(&header)?;
    let bytes_per_voxel = bytes_per_voxel(header.datatype)?;
    let offset = data_offset(header.vox_offset)?;
    let voxel_count = shape
        .iter()
        .try_fold(1u64, |acc, &n| acc.checked_mul(n as u64))
        .ok_or_else(|| NiftiError::BadHeader("the dimensions overflow".into()))?;
    let image_bytes = voxel_count
        .checked_mul(bytes_per_voxel as u64)
        .ok_or_else(|| NiftiError::BadHeader("the dimensions overflow".into()))?;
    Ok(Header {
        shape,
        affine: best_affine(&header)?,
        endianness: header.endianness,
        datatype: header.datatype,
        bytes_per_voxel,
        scaling: read_scaling(&header)?,
        offset,
        image_bytes,
    })
}

/// A 3D scalar volume: dim[0] = 3, or 4..7 with every extra dimension equal to 1.
fn scalar_3d_shape(header: &NiftiHeader) -> Result<[usize; 3], NiftiError> {
    let ndim = header.dim[0] as usize;
    if !(1..=7).contains(&ndim) {
        return Err(NiftiError::BadHeader(format!(
            "dim[0] = {ndim} must be between 1 and 7"
        )));
    }
    let dims = &header.dim[1..=ndim];
    if let Some(zero) = dims.iter().position(|&d| d == 0 || d > i16::MAX as u16) {
        return Err(NiftiError::BadHeader(format!(
            "dim[{}] = {} must be positive",
            zero + 1,
            dims[zero] as i16
        )));
    }
    if ndim < 3 {
        return Err(NiftiError::NotScalar3d(format!(
            "it has {ndim} dimension(s) ({dims:?}); Deepgrow 2D needs a 3D volume"
        )));
    }
    if dims[3..].iter().any(|&d| d != 1) {
        return Err(NiftiError::NotScalar3d(format!(
            "its dimensions are {dims:?}: a 4D (or higher) series with more than one volume; upload a single 3D volume"
        )));
    }
    Ok([dims[0] as usize, dims[1] as usize, dims[2] as usize])
}

fn bytes_per_voxel(datatype: i16) -> Result<usize, NiftiError> {
    Ok(match datatype {
        2 | 256 => 1,
        4 | 512 => 2,
        8 | 16 | 768 => 4,
        64 | 1024 | 1280 => 8,
        128 | 2304 => {
            return Err(NiftiError::NotScalar3d(
                "it holds RGB colour voxels, not intensities".into(),
            ))
        }
        32 | 1792 | 2048 => {
            return Err(NiftiError::NotScalar3d(
                "it holds complex-valued voxels".into(),
            ))
        }
        1 => return Err(NiftiError::UnsupportedDatatype("1 (binary)".into())),
        1536 => return Err(NiftiError::UnsupportedDatatype("1536 (float128)".into())),
        other => return Err(NiftiError::UnsupportedDatatype(other.to_string())),
    })
}

fn data_offset(vox_offset: f32) -> Result<usize, NiftiError> {
    if !vox_offset.is_finite() || vox_offset < 0.0 || vox_offset.fract() != 0.0 {
        return Err(NiftiError::BadHeader(format!(
            "vox_offset {vox_offset} is not a byte offset"
        )));
    }
    // nibabel reads vox_offset 0 in a single file as "data right after the header".
    let offset = if vox_offset == 0.0 {
        MIN_SINGLE_FILE_OFFSET
    } else {
        vox_offset as usize
    };
    if offset < MIN_SINGLE_FILE_OFFSET {
        return Err(NiftiError::BadHeader(format!(
            "vox_offset {offset} points inside the header (it must be at least {MIN_SINGLE_FILE_OFFSET})"
        )));
    }
    Ok(offset)
}

fn read_scaling(header: &NiftiHeader) -> Result<Option<Scaling>, NiftiError> {
    let (slope, inter) = (header.scl_slope, header.scl_inter);
    if slope == 0.0 || !slope.is_finite() {
        return Ok(None);
    }
    if !inter.is_finite() {
        return Err(NiftiError::BadHeader(format!(
            "scl_inter {inter} is not finite"
        )));
    }
    if slope == 1.0 && inter == 0.0 {
        return Ok(None);
    }
    Ok(Some(Scaling { slope, inter }))
}

/// nibabel's `get_best_affine`: sform if its code is non-zero, else qform if its code is non-zero, else the
/// pixdim-based fallback. Header values are float32; the qform is composed in float32 as nibabel does.
fn best_affine(h: &NiftiHeader) -> Result<[[f64; 4]; 4], NiftiError> {
    let mut affine = [[0.0f64; 4]; 4];
    affine[3][3] = 1.0;
    if h.sform_code != 0 {
        for (row, srow) in [h.srow_x, h.srow_y, h.srow_z].iter().enumerate() {
            for col in 0..4 {
                affine[row][col] = srow[col] as f64;
            }
        }
    } else if h.qform_code != 0 {
        let rotation = quaternion_rotation(h.quatern_b, h.quatern_c, h.quatern_d)?;
        let mut zooms = [h.pixdim[1], h.pixdim[2], h.pixdim[3]];
        if zooms.iter().any(|&z| z < 0.0) {
            return Err(NiftiError::BadHeader("negative pixdim with a qform".into()));
        }
        let qfac = if h.pixdim[0] == -1.0 { -1.0f32 } else { 1.0 };
        zooms[2] *= qfac;
        for row in 0..3 {
            for col in 0..3 {
                affine[row][col] = (rotation[row][col] * zooms[col]) as f64;
            }
        }
        affine[0][3] = h.quatern_x as f64;
        affine[1][3] = h.quatern_y as f64;
        affine[2][3] = h.quatern_z as f64;
    } else {
        // nibabel's base affine: x flipped, origin at the volume centre.
        let shape = [h.dim[1], h.dim[2], h.dim[3]];
        let zooms = [
            -(h.pixdim[1] as f64),
            h.pixdim[2] as f64,
            h.pixdim[3] as f64,
        ];
        for axis in 0..3 {
            affine[axis][axis] = zooms[axis];
            affine[axis][3] = -((shape[axis] as f64 - 1.0) / 2.0) * zooms[axis];
        }
    }
    if affine.iter().flatten().any(|v| !v.is_finite()) {
        return Err(NiftiError::BadHeader(
            "the affine contains NaN or infinity".into(),
        ));
    }
    Ok(affine)
}

/// nibabel's `fillpositive` + `quat2mat`, in float32 like nibabel on float32 header fields.
fn quaternion_rotation(b: f32, c: f32, d: f32) -> Result<[[f32; 3]; 3], NiftiError> {
    let threshold = -3.0 * f32::EPSILON;
    let w2 = 1.0 - (b * b + c * c + d * d);
    let a = if w2 < 0.0 {
        if w2 < threshold {
            return Err(NiftiError::BadHeader(
                "the qform quaternion has a norm above 1".into(),
            ));
        }
        0.0
    } else {
        w2.sqrt()
    };
    let (w, x, y, z) = (a, b, c, d);
    let nq = w * w + x * x + y * y + z * z;
    if nq < f32::EPSILON {
        return Ok([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]);
    }
    let s = 2.0 / nq;
    let (xs, ys, zs) = (x * s, y * s, z * s);
    let (wx, wy, wz) = (w * xs, w * ys, w * zs);
    let (xx, xy, xz) = (x * xs, x * ys, x * zs);
    let (yy, yz, zz) = (y * ys, y * zs, z * zs);
    Ok([
        [1.0 - (yy + zz), xy - wz, xz + wy],
        [xy + wz, 1.0 - (xx + zz), yz - wx],
        [xz - wy, yz + wx, 1.0 - (xx + yy)],
    ])
}

/// Output voxel type of a mask file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaskDtype {
    U8,
    U16,
}

impl MaskDtype {
    fn nifti_code(self) -> (i16, i16) {
        match self {
            MaskDtype::U8 => (2, 8),
            MaskDtype::U16 => (512, 16),
        }
    }

    pub fn bytes(self) -> usize {
        match self {
            MaskDtype::U8 => 1,
            MaskDtype::U16 => 2,
        }
    }
}

/// A mask file as the chunks it is sent in: the runs of zeros before and after the clicked slice are shared
/// (raw files) or compressed once per process (gzip), never built voxel by voxel.
#[derive(Debug, Clone, Default)]
pub struct MaskFile(pub Vec<Bytes>);

impl MaskFile {
    pub fn len(&self) -> usize {
        self.0.iter().map(Bytes::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The file in one buffer (tests, tools).
    pub fn to_vec(&self) -> Vec<u8> {
        self.0.concat()
    }
}

/// A block of zeros that raw mask files point into.
static ZEROS: [u8; ZERO_BLOCK] = [0; ZERO_BLOCK];
const ZERO_BLOCK: usize = 1 << 20;

/// Slice `k` of the mask in the file's voxel order (i fastest) and type, in the given byte order (the input's, so
/// its raw header stays valid).
fn mask_plane(
    shape: [usize; 3],
    mask: ArrayView2<u8>,
    dtype: MaskDtype,
    big_endian: bool,
) -> Vec<u8> {
    let [h, w, _] = shape;
    let voxel = dtype.bytes();
    let mut plane = vec![0u8; h * w * voxel];
    for ((i, j), &value) in mask.indexed_iter() {
        if value != 0 {
            let at = (j * h + i) * voxel;
            match dtype {
                MaskDtype::U8 => plane[at] = value,
                MaskDtype::U16 => put_ordered!(plane, at, value as u16, big_endian),
            }
        }
    }
    plane
}

/// `head`, then the whole mask volume: zero everywhere except slice `k`, which holds `plane`. Raw (`gzip`
/// `None`), or as one gzip stream (`Some(head_inside)`: whether `head` is compressed with the voxels).
fn mask_file(
    head: Vec<u8>,
    shape: [usize; 3],
    k: usize,
    plane: Vec<u8>,
    gzip: Option<bool>,
) -> MaskFile {
    let before = k * plane.len();
    let after = (shape[2] - k - 1) * plane.len();
    match gzip {
        None => {
            let mut chunks = vec![Bytes::from(head)];
            push_zeros(&mut chunks, before);
            chunks.push(Bytes::from(plane));
            push_zeros(&mut chunks, after);
            MaskFile(chunks)
        }
        Some(head_inside) => {
            let mut chunks = Vec::new();
            let mut stream = GzipStream::new();
            if head_inside {
                stream.data(&head);
            } else {
                chunks.push(Bytes::from(head));
            }
            stream.zeros(before);
            stream.data(&plane);
            stream.zeros(after);
            chunks.extend(stream.finish());
            MaskFile(chunks)
        }
    }
}

fn push_zeros(chunks: &mut Vec<Bytes>, mut n: usize) {
    while n > 0 {
        let take = n.min(ZERO_BLOCK);
        chunks.push(Bytes::from_static(&ZEROS[..take]));
        n -= take;
    }
}

/// One gzip member built from independently deflated segments (each ends with a full flush, so it is
/// byte-aligned and refers to nothing before it): a run of zeros is the once-compressed segment of a
/// `ZERO_BLOCK` repeated, and its CRC is combined rather than computed. A 512 × 512 × 200 mask takes about a
/// millisecond instead of deflating 50 MB of zeros.
struct GzipStream {
    chunks: Vec<Bytes>,
    crc: flate2::Crc,
}

impl GzipStream {
    fn new() -> Self {
        // magic, deflate, no flags, no mtime, no extra flags, OS unknown
        let header = Bytes::from_static(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff]);
        GzipStream {
            chunks: vec![header],
            crc: flate2::Crc::new(),
        }
    }

    fn segment(data: &[u8], flush: flate2::FlushCompress) -> Vec<u8> {
        // Masks are almost all zeros: the fastest level already compresses them well.
        let mut deflate = flate2::Compress::new(Compression::fast(), false);
        let mut out = Vec::with_capacity(data.len() / 8 + 64);
        loop {
            let consumed = deflate.total_in() as usize;
            deflate
                .compress_vec(&data[consumed..], &mut out, flush)
                .expect("deflating into a Vec cannot fail");
            if deflate.total_in() as usize == data.len() && out.len() < out.capacity() {
                return out;
            }
            out.reserve(out.capacity().max(64));
        }
    }

    fn data(&mut self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        self.crc.update(data);
        self.chunks.push(Bytes::from(Self::segment(
            data,
            flate2::FlushCompress::Full,
        )));
    }

    fn zeros(&mut self, n: usize) {
        static BLOCK: OnceLock<(Bytes, flate2::Crc)> = OnceLock::new();
        let (segment, crc) = BLOCK.get_or_init(|| {
            let mut crc = flate2::Crc::new();
            crc.update(&ZEROS);
            (
                Bytes::from(Self::segment(&ZEROS, flate2::FlushCompress::Full)),
                crc,
            )
        });
        for _ in 0..n / ZERO_BLOCK {
            self.chunks.push(segment.clone());
            self.crc.combine(crc);
        }
        self.data(&ZEROS[..n % ZERO_BLOCK]);
    }

    fn finish(mut self) -> Vec<Bytes> {
        self.chunks.push(Bytes::from(Self::segment(
            &[],
            flate2::FlushCompress::Finish,
        )));
        let mut trailer = self.crc.sum().to_le_bytes().to_vec();
        trailer.extend_from_slice(&self.crc.amount().to_le_bytes());
        self.chunks.push(Bytes::from(trailer));
        self.chunks
    }
}

/// Encodes a mask as a single-file NIfTI-1 with the input's exact header geometry (and byte order).
pub fn encode_mask_nifti(
    geometry: &Geometry,
    k: usize,
    mask: ArrayView2<u8>,
    dtype: MaskDtype,
    compress: bool,
) -> MaskFile {
    let big_endian = geometry.endianness == Endianness::Big;
    let mut header = *geometry.raw_header;
    let (datatype, bitpix) = dtype.nifti_code();
    put_ordered!(header, 68, 0i16, big_endian); // intent_code: a plain label image
    put_ordered!(header, 70, datatype, big_endian);
    put_ordered!(header, 72, bitpix, big_endian);
    put_ordered!(header, 108, MIN_SINGLE_FILE_OFFSET as f32, big_endian); // vox_offset
    put_ordered!(header, 112, 1.0f32, big_endian); // scl_slope
    put_ordered!(header, 116, 0.0f32, big_endian); // scl_inter
    put_ordered!(header, 124, 1.0f32, big_endian); // cal_max
    put_ordered!(header, 128, 0.0f32, big_endian); // cal_min
    header[344..348].copy_from_slice(b"n+1\0");

    let mut head = header.to_vec();
    head.extend_from_slice(&[0u8; 4]); // no extensions
    let plane = mask_plane(geometry.shape, mask, dtype, big_endian);
    mask_file(head, geometry.shape, k, plane, compress.then_some(true))
}

/// Encodes a mask as NRRD (what the OHIF AIAA extension reads), with the input's world geometry.
pub fn encode_mask_nrrd(
    geometry: &Geometry,
    k: usize,
    mask: ArrayView2<u8>,
    dtype: MaskDtype,
    compress: bool,
) -> MaskFile {
    let [h, w, d] = geometry.shape;
    let a = &geometry.affine;
    let direction = |col: usize| format!("({},{},{})", a[0][col], a[1][col], a[2][col]);
    let header = format!(
        "NRRD0004\n# Complete NRRD file format specification at:\n# http://teem.sourceforge.net/nrrd/format.html\n\
         type: {}\ndimension: 3\nspace: right-anterior-superior\nsizes: {h} {w} {d}\n\
         space directions: {} {} {}\nkinds: domain domain domain\nendian: little\nencoding: {}\n\
         space origin: ({},{},{})\n\n",
        match dtype {
            MaskDtype::U8 => "uint8",
            MaskDtype::U16 => "uint16",
        },
        direction(0),
        direction(1),
        direction(2),
        if compress { "gzip" } else { "raw" },
        a[0][3],
        a[1][3],
        a[2][3],
    );
    let plane = mask_plane(geometry.shape, mask, dtype, false);
    // the header stays plain text; with gzip, the voxels alone are the stream
    mask_file(
        header.into_bytes(),
        geometry.shape,
        k,
        plane,
        compress.then_some(false),
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use flate2::write::GzEncoder;

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut encoder = GzEncoder::new(Vec::new(), Compression::fast());
        std::io::Write::write_all(&mut encoder, bytes).unwrap();
        encoder.finish().unwrap()
    }

    /// A minimal little- or big-endian NIfTI-1 file, built byte by byte (independent of the decoder).
    pub(crate) fn synthetic_nifti(
        shape: [u16; 3],
        datatype: i16,
        bitpix: i16,
        data: &[u8],
        big: bool,
    ) -> Vec<u8> {
        let srows = [
            [-0.8f32, 0.0, 0.0, 10.0],
            [0.0, 0.8, 0.0, -20.0],
            [0.0, 0.0, 2.5, 30.0],
        ];
        synthetic_nifti_with_sform(shape, datatype, bitpix, data, big, srows)
    }

    /// [`synthetic_nifti`] with the given sform rows (pixdim follows the columns' lengths).
    pub(crate) fn synthetic_nifti_with_sform(
        shape: [u16; 3],
        datatype: i16,
        bitpix: i16,
        data: &[u8],
        big: bool,
        srows: [[f32; 4]; 3],
    ) -> Vec<u8> {
        let mut h = vec![0u8; 352];
        let i32b = |v: i32| {
            if big {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            }
        };
        let i16b = |v: i16| {
            if big {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            }
        };
        let f32b = |v: f32| {
            if big {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            }
        };
        h[0..4].copy_from_slice(&i32b(348));
        let dims = [
            3i16,
            shape[0] as i16,
            shape[1] as i16,
            shape[2] as i16,
            1,
            1,
            1,
            1,
        ];
        for (n, d) in dims.iter().enumerate() {
            h[40 + 2 * n..42 + 2 * n].copy_from_slice(&i16b(*d));
        }
        h[70..72].copy_from_slice(&i16b(datatype));
        h[72..74].copy_from_slice(&i16b(bitpix));
        let column_length = |c: usize| (0..3).map(|r| srows[r][c].powi(2)).sum::<f32>().sqrt();
        let pixdim = [1.0f32, column_length(0), column_length(1), column_length(2)];
        for (n, p) in pixdim.iter().enumerate() {
            h[76 + 4 * n..80 + 4 * n].copy_from_slice(&f32b(*p));
        }
        h[108..112].copy_from_slice(&f32b(352.0));
        h[112..116].copy_from_slice(&f32b(0.0));
        h[254..256].copy_from_slice(&i16b(2)); // sform_code
        for (r, row) in srows.iter().enumerate() {
            for (c, v) in row.iter().enumerate() {
                h[280 + 16 * r + 4 * c..284 + 16 * r + 4 * c].copy_from_slice(&f32b(*v));
            }
        }
        h[344..348].copy_from_slice(b"n+1\0");
        h.extend_from_slice(data);
        h
    }

    fn limits() -> DecodeLimits {
        DecodeLimits {
            max_decompressed_bytes: 1 << 30,
        }
    }

    #[test]
    fn decodes_both_byte_orders_to_the_same_values() {
        let values: Vec<i16> = (0..4 * 3 * 2).map(|v| v as i16 * 100 - 1000).collect();
        let le: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let be: Vec<u8> = values.iter().flat_map(|v| v.to_be_bytes()).collect();
        let a = decode(&synthetic_nifti([4, 3, 2], 4, 16, &le, false), limits()).unwrap();
        let b = decode(&synthetic_nifti([4, 3, 2], 4, 16, &be, true), limits()).unwrap();
        assert_eq!(a.data, VoxelData::I16(values.clone()));
        assert_eq!(a.data, b.data);
        assert_eq!(a.geometry.affine, b.geometry.affine);
        assert_eq!(a.geometry.shape, [4, 3, 2]);
        assert_eq!(a.geometry.affine[0], [-0.800000011920929, 0.0, 0.0, 10.0]);
        // slice 1, voxel (i=2, j=1) is element 2 + 1*4 + 1*12 of the i-fastest buffer
        let slice = a.slice_f32(1);
        assert_eq!(slice.dim(), (4, 3));
        assert_eq!(slice[[2, 1]], values[2 + 4 + 12] as f32);
    }

    /// A reader that counts what is taken from it.
    struct Counting<R> {
        inner: R,
        taken: std::sync::Arc<std::sync::atomic::AtomicU64>,
    }

    impl<R: Read> Read for Counting<R> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.inner.read(buf)?;
            self.taken
                .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
            Ok(n)
        }
    }

    /// A valid header and image followed by `extra` zero bytes, gzipped.
    fn bomb(extra: u64) -> Vec<u8> {
        let file = synthetic_nifti([8, 4, 3], 4, 16, &[3u8; 192], false);
        let mut encoder = GzEncoder::new(Vec::new(), Compression::best());
        std::io::Write::write_all(&mut encoder, &file).unwrap();
        let zeros = vec![0u8; 1 << 20];
        let mut left = extra;
        while left > 0 {
            let n = left.min(zeros.len() as u64) as usize;
            std::io::Write::write_all(&mut encoder, &zeros[..n]).unwrap();
            left -= n as u64;
        }
        encoder.finish().unwrap()
    }

    #[test]
    fn a_stream_is_inflated_no_further_than_the_header_needs() {
        // 256 MiB of zeros after a 192-byte image: the full decode stops one allowance past the image and
        // refuses; the slice read stops at the end of its slice; neither allocates more than the image.
        let gz = bomb(256 << 20);
        let taken = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let stream = || {
            FileBytes::Stream(Box::new(Counting {
                inner: std::io::Cursor::new(gz.clone()),
                taken: taken.clone(),
            }))
        };
        match open(stream(), limits()).unwrap().read_volume() {
            Err(NiftiError::TrailingData { image: 192, .. }) => {}
            other => panic!("expected TrailingData, got {other:?}"),
        }
        // 1 MiB of zeros compresses to about 1 KiB: the decoder read one 64 KiB buffer of the 255 KiB stream
        let read = taken.swap(0, std::sync::atomic::Ordering::Relaxed);
        assert!(read <= 66 << 10, "read {read} of {} bytes", gz.len());
        let slice = open(stream(), limits()).unwrap().read_slice(1).unwrap();
        assert_eq!(slice.dim(), (8, 4));
        assert!(slice
            .iter()
            .all(|&v| v == f32::from(i16::from_le_bytes([3, 3]))));
        let read = taken.load(std::sync::atomic::Ordering::Relaxed);
        assert!(read <= 66 << 10, "read {read} bytes for one slice");
        // a little padding after the image is ignored, in memory and streamed
        let padded = bomb(1000);
        assert_eq!(
            decode(&padded, limits()).unwrap().data,
            VoxelData::I16(vec![i16::from_le_bytes([3, 3]); 96])
        );
    }

    #[test]
    fn slices_read_from_a_file_equal_slices_of_the_volume() {
        let values: Vec<i16> = (0..5 * 4 * 3).map(|v| v as i16 * 7 - 100).collect();
        for big in [false, true] {
            let data: Vec<u8> = values
                .iter()
                .flat_map(|v| {
                    if big {
                        v.to_be_bytes()
                    } else {
                        v.to_le_bytes()
                    }
                })
                .collect();
            let file = synthetic_nifti([5, 4, 3], 4, 16, &data, big);
            let volume = decode(&file, limits()).unwrap();
            for bytes in [file.clone(), gzip(&file)] {
                for k in 0..3 {
                    let memory = open(FileBytes::Memory(&bytes), limits()).unwrap();
                    assert_eq!(memory.read_slice(k).unwrap(), volume.slice_f32(k));
                    let stream = FileBytes::Stream(Box::new(std::io::Cursor::new(bytes.clone())));
                    let streamed = open(stream, limits()).unwrap();
                    assert_eq!(streamed.geometry(), &volume.geometry);
                    assert_eq!(streamed.read_slice(k).unwrap(), volume.slice_f32(k));
                }
            }
        }
        // a file cut inside slice 2 still gives slices 0 and 1
        let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let file = synthetic_nifti([5, 4, 3], 4, 16, &data, false);
        let cut = &file[..file.len() - 10];
        assert!(open(FileBytes::Memory(cut), limits())
            .unwrap()
            .read_slice(1)
            .is_ok());
        match open(FileBytes::Memory(cut), limits())
            .unwrap()
            .read_slice(2)
        {
            Err(NiftiError::Truncated {
                expected: 120,
                available: 110,
                ..
            }) => {}
            other => panic!("expected Truncated, got {other:?}"),
        }
    }

    #[test]
    fn rejects_headers_that_mix_byte_orders() {
        for big in [false, true] {
            let mut file = synthetic_nifti([2, 2, 2], 2, 8, &[1u8; 8], big);
            let swapped = if big {
                348i32.to_le_bytes()
            } else {
                348i32.to_be_bytes()
            };
            file[0..4].copy_from_slice(&swapped);
            match decode(&file, limits()) {
                Err(NiftiError::BadHeader(message)) => assert!(message.contains("byte orders")),
                other => panic!("expected BadHeader, got {other:?}"),
            }
        }
    }

    #[test]
    fn rejects_truncated_data_with_sizes() {
        let file = synthetic_nifti([4, 3, 2], 4, 16, &[0u8; 10], false);
        match decode(&file, limits()) {
            Err(NiftiError::Truncated {
                expected: 48,
                available: 10,
                ..
            }) => {}
            other => panic!("expected Truncated, got {other:?}"),
        }
    }

    #[test]
    fn gzip_is_detected_by_magic_and_bounded() {
        let file = synthetic_nifti([4, 3, 2], 2, 8, &[7u8; 24], false);
        let gz = gzip(&file);
        let volume = decode(&gz, limits()).unwrap();
        assert!(volume.was_compressed);
        assert_eq!(volume.data, VoxelData::U8(vec![7; 24]));
        let tiny = DecodeLimits {
            max_decompressed_bytes: 100,
        };
        assert!(matches!(
            decode(&gz, tiny),
            Err(NiftiError::TooLarge { limit: 100 })
        ));
    }

    #[test]
    fn rejects_rgb_and_4d_series() {
        let rgb = synthetic_nifti([2, 2, 2], 128, 24, &[0u8; 24], false);
        assert!(matches!(
            decode(&rgb, limits()),
            Err(NiftiError::NotScalar3d(_))
        ));
        let mut four_d = synthetic_nifti([2, 2, 2], 2, 8, &[0u8; 16], false);
        four_d[40..42].copy_from_slice(&4i16.to_le_bytes());
        four_d[48..50].copy_from_slice(&2i16.to_le_bytes());
        assert!(matches!(
            decode(&four_d, limits()),
            Err(NiftiError::NotScalar3d(_))
        ));
    }

    #[test]
    fn gzip_masks_are_one_member_with_the_right_crc_and_size() {
        // 512 x 512 x 7: before slice 4, 1 MiB of zeros in uint8 (one whole zero block) and 2 MiB in uint16;
        // before slice 6 more, with a remainder
        let shape = [512u16, 512, 7];
        let file = synthetic_nifti(shape, 2, 8, &vec![0u8; 512 * 512 * 7], false);
        let volume = decode(&file, limits()).unwrap();
        let mut mask = Array2::<u8>::zeros((512, 512));
        mask[[511, 0]] = 1;
        mask[[7, 150]] = 1;
        for dtype in [MaskDtype::U8, MaskDtype::U16] {
            for k in [0, 4, 6] {
                let raw =
                    encode_mask_nifti(&volume.geometry, k, mask.view(), dtype, false).to_vec();
                let gz = encode_mask_nifti(&volume.geometry, k, mask.view(), dtype, true).to_vec();
                // a strict single-member reader checks the CRC and the length
                let mut inflated = Vec::new();
                flate2::read::GzDecoder::new(&gz[..])
                    .read_to_end(&mut inflated)
                    .unwrap();
                assert_eq!(inflated, raw, "{dtype:?}, slice {k}");
                let nrrd = encode_mask_nrrd(&volume.geometry, k, mask.view(), dtype, true).to_vec();
                let body = nrrd.windows(2).position(|w| w == b"\n\n").unwrap() + 2;
                let mut voxels = Vec::new();
                flate2::read::GzDecoder::new(&nrrd[body..])
                    .read_to_end(&mut voxels)
                    .unwrap();
                let plain =
                    encode_mask_nrrd(&volume.geometry, k, mask.view(), dtype, false).to_vec();
                let plain_body = plain.windows(2).position(|w| w == b"\n\n").unwrap() + 2;
                assert_eq!(voxels, plain[plain_body..], "NRRD {dtype:?}, slice {k}");
            }
        }
    }

    #[test]
    fn mask_keeps_header_geometry_and_touches_only_slice_k() {
        let file = synthetic_nifti([4, 3, 2], 4, 16, &[0u8; 48], true);
        let volume = decode(&file, limits()).unwrap();
        let mut mask = Array2::<u8>::zeros((4, 3));
        mask[[3, 2]] = 1;
        let encoded =
            encode_mask_nifti(&volume.geometry, 1, mask.view(), MaskDtype::U8, false).to_vec();
        let decoded = decode(&encoded, limits()).unwrap();
        assert_eq!(decoded.geometry.shape, volume.geometry.shape);
        assert_eq!(decoded.geometry.affine, volume.geometry.affine);
        let VoxelData::U8(values) = decoded.data else {
            panic!("uint8 expected")
        };
        let set: Vec<usize> = values
            .iter()
            .enumerate()
            .filter(|(_, v)| **v != 0)
            .map(|(n, _)| n)
            .collect();
        assert_eq!(set, vec![3 + 2 * 4 + 12]);
        // Everything but the datatype fields equals the input header.
        for (n, (a, b)) in encoded[..348].iter().zip(&file[..348]).enumerate() {
            if !(68..76).contains(&n) && !(108..120).contains(&n) && !(124..132).contains(&n) {
                assert_eq!(a, b, "header byte {n} changed");
            }
        }
    }
}
