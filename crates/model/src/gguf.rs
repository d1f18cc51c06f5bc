//! GGUF files (versions 2 and 3, little-endian): metadata, tensor directory and memory-mapped
//! tensor data.
//!
//! Files come from the internet, so every length, count and offset is checked against the bytes
//! actually present before it is used, and nothing is allocated from a count that the remaining
//! bytes could not possibly hold.

use crate::{ModelError, Result};
use marlin_quant::ggml::GgmlType;
use memmap2::Mmap;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml's limit; also keeps a corrupt dimension count from driving allocation.
const MAX_DIMS: u32 = 4;
/// Arrays of arrays are legal but nothing real nests deeply; the limit bounds recursion.
const MAX_ARRAY_DEPTH: usize = 4;

/// A metadata value. GGUF value type ids: 0 u8, 1 i8, 2 u16, 3 i16, 4 u32, 5 i32, 6 f32, 7 bool,
/// 8 string, 9 array, 10 u64, 11 i64, 12 f64.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<MetaValue>),
}

impl MetaValue {
    /// Any integer type, widened.
    pub fn as_i128(&self) -> Option<i128> {
        Some(match *self {
            MetaValue::U8(v) => v.into(),
            MetaValue::I8(v) => v.into(),
            MetaValue::U16(v) => v.into(),
            MetaValue::I16(v) => v.into(),
            MetaValue::U32(v) => v.into(),
            MetaValue::I32(v) => v.into(),
            MetaValue::U64(v) => v.into(),
            MetaValue::I64(v) => v.into(),
            _ => return None,
        })
    }

    pub fn as_u64(&self) -> Option<u64> {
        self.as_i128().and_then(|v| u64::try_from(v).ok())
    }

    pub fn as_i32(&self) -> Option<i32> {
        self.as_i128().and_then(|v| i32::try_from(v).ok())
    }

    /// f32 or f64; f64 is narrowed because every consumer computes in f32.
    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            MetaValue::F32(v) => Some(v),
            MetaValue::F64(v) => Some(v as f32),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// A short description for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            MetaValue::U8(_) => "u8",
            MetaValue::I8(_) => "i8",
            MetaValue::U16(_) => "u16",
            MetaValue::I16(_) => "i16",
            MetaValue::U32(_) => "u32",
            MetaValue::I32(_) => "i32",
            MetaValue::U64(_) => "u64",
            MetaValue::I64(_) => "i64",
            MetaValue::F32(_) => "f32",
            MetaValue::F64(_) => "f64",
            MetaValue::Bool(_) => "bool",
            MetaValue::String(_) => "string",
            MetaValue::Array(_) => "array",
        }
    }
}

/// One entry of the tensor directory.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensor {
    pub name: String,
    /// GGUF order: `dims[0]` is the contiguous row length, the last is the slowest-varying.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Absolute byte offset of the data in the file (the file's data section start plus the
    /// offset recorded in the directory).
    pub offset: u64,
}

impl GgufTensor {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Size of the data in bytes. Checked at open to be a whole number of blocks that fits the
    /// file.
    pub fn n_bytes(&self) -> usize {
        self.ty
            .bytes_for(self.n_elements() as usize)
            .expect("checked when the file was opened")
    }
}

/// An opened GGUF file. Tensor data stays in the memory map and is lent out by
/// [`GgufFile::tensor_bytes`].
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    version: u32,
    alignment: u64,
    data_offset: u64,
    pub metadata: BTreeMap<String, MetaValue>,
    tensors: Vec<GgufTensor>,
    by_name: HashMap<String, usize>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<GgufFile> {
        let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
        // SAFETY: the map is read-only; as with every mmap-based loader, a file truncated or
        // rewritten by another process while we hold it is outside what we can defend against.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
        Self::parse(path.to_path_buf(), mmap)
    }

    fn parse(path: PathBuf, mmap: Mmap) -> Result<GgufFile> {
        let mut r = Reader {
            bytes: &mmap,
            pos: 0,
            path: &path,
            context: "the header".to_string(),
        };
        if r.take(4)? != MAGIC {
            return Err(r.error("not a GGUF file (bad magic)"));
        }
        let version = r.u32()?;
        if version.swap_bytes() == 2 || version.swap_bytes() == 3 {
            return Err(r.error("big-endian GGUF files are not supported"));
        }
        if version != 2 && version != 3 {
            return Err(r.error(format!(
                "unsupported GGUF version {version} (supported: 2, 3)"
            )));
        }
        r.context = "the tensor count".into();
        let tensor_count = r.u64()?;
        r.context = "the metadata count".into();
        let kv_count = r.u64()?;
        // Each key/value takes at least 12 bytes (key length and value type), each tensor entry
        // at least 24 (name length, dimension count, type, offset).
        r.check_count(kv_count, 12, "metadata entries")?;
        r.check_count(tensor_count, 24, "tensors")?;

        let mut metadata = BTreeMap::new();
        for i in 0..kv_count {
            r.context = format!("metadata key #{i}");
            let key = r.string()?;
            r.context = format!("metadata key #{i} (`{key}`)");
            let ty = r.u32()?;
            let value = r.value(ty, 0)?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(r.error("duplicate key"));
            }
        }

        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a.is_power_of_two() => a,
                _ => {
                    return Err(ModelError::format(
                        &path,
                        format!("field `general.alignment`: {v:?} is not a power of two"),
                    ))
                }
            },
        };

        let mut infos = Vec::with_capacity(tensor_count as usize);
        for i in 0..tensor_count {
            r.context = format!("tensor info #{i}");
            let name = r.string()?;
            r.context = format!("tensor info #{i} (`{name}`)");
            let n_dims = r.u32()?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(r.error(format!("{n_dims} dimensions (expected 1 to {MAX_DIMS})")));
            }
            let dims = (0..n_dims).map(|_| r.u64()).collect::<Result<Vec<_>>>()?;
            let type_id = r.u32()?;
            let rel_offset = r.u64()?;
            infos.push((name, dims, type_id, rel_offset));
        }
        let data_offset = align_up(r.pos as u64, alignment);
        let file_len = mmap.len() as u64;

        let mut tensors = Vec::with_capacity(infos.len());
        let mut by_name = HashMap::with_capacity(infos.len());
        for (name, dims, type_id, rel_offset) in infos {
            let err = |message: String| ModelError::format(&path, message);
            let ty = GgmlType::from_id(type_id)
                .ok_or_else(|| err(format!("unsupported tensor type {type_id} for `{name}`")))?;
            let n_elements = dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| err(format!("tensor `{name}` dims {dims:?} overflow")))?;
            if !dims[0].is_multiple_of(ty.block_size() as u64) {
                return Err(err(format!(
                    "tensor `{name}` rows of {} elements are not a whole number of {ty} blocks ({})",
                    dims[0],
                    ty.block_size()
                )));
            }
            let n_bytes = ty
                .bytes_for(n_elements)
                .ok_or_else(|| err(format!("tensor `{name}` dims {dims:?} overflow")))?;
            if !rel_offset.is_multiple_of(alignment) {
                return Err(err(format!(
                    "tensor `{name}` offset {rel_offset} is not a multiple of the alignment {alignment}"
                )));
            }
            let start = data_offset.checked_add(rel_offset);
            let end = start.and_then(|s| s.checked_add(n_bytes as u64));
            match (start, end) {
                (Some(start), Some(end)) if end <= file_len => {
                    if by_name.insert(name.clone(), tensors.len()).is_some() {
                        return Err(err(format!("duplicate tensor `{name}`")));
                    }
                    tensors.push(GgufTensor {
                        name,
                        dims,
                        ty,
                        offset: start,
                    });
                }
                _ => {
                    return Err(err(format!(
                        "tensor `{name}` data [{}, {}) lies outside the file ({file_len} bytes)",
                        data_offset as u128 + rel_offset as u128,
                        data_offset as u128 + rel_offset as u128 + n_bytes as u128
                    )))
                }
            }
        }

        Ok(GgufFile {
            path,
            mmap,
            version,
            alignment,
            data_offset,
            metadata,
            tensors,
            by_name,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Where the tensor data section starts in the file.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Result<&str> {
        self.get_str("general.architecture")
    }

    /// Tensors in directory order.
    pub fn tensors(&self) -> impl ExactSizeIterator<Item = &GgufTensor> {
        self.tensors.iter()
    }

    pub fn tensor(&self, name: &str) -> Option<&GgufTensor> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The tensor's data. Panics if `tensor` came from another file and does not fit this one.
    pub fn tensor_bytes(&self, tensor: &GgufTensor) -> &[u8] {
        let start = tensor.offset as usize;
        &self.mmap[start..start + tensor.n_bytes()]
    }

    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    fn field_error(&self, key: &str, message: impl std::fmt::Display) -> ModelError {
        ModelError::format(&self.path, format!("field `{key}`: {message}"))
    }

    /// The value under `key` converted by `convert`, or an error naming the key and `expected`.
    fn typed<'a, T>(
        &'a self,
        key: &str,
        expected: &str,
        convert: impl FnOnce(&'a MetaValue) -> Option<T>,
    ) -> Result<T> {
        let value = self
            .metadata
            .get(key)
            .ok_or_else(|| self.field_error(key, "missing"))?;
        convert(value).ok_or_else(|| {
            self.field_error(
                key,
                format!("expected {expected}, found {}", describe(value)),
            )
        })
    }

    fn typed_array<'a, T>(
        &'a self,
        key: &str,
        expected: &str,
        convert: impl Fn(&'a MetaValue) -> Option<T>,
    ) -> Result<Vec<T>> {
        self.typed(key, expected, |v| {
            v.as_array()?
                .iter()
                .map(&convert)
                .collect::<Option<Vec<T>>>()
        })
    }

    pub fn get_str(&self, key: &str) -> Result<&str> {
        self.typed(key, "a string", MetaValue::as_str)
    }

    /// Any non-negative integer type.
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        self.typed(key, "a non-negative integer", MetaValue::as_u64)
    }

    /// f32 or f64.
    pub fn get_f32(&self, key: &str) -> Result<f32> {
        self.typed(key, "a float", MetaValue::as_f32)
    }

    pub fn get_bool(&self, key: &str) -> Result<bool> {
        self.typed(key, "a bool", MetaValue::as_bool)
    }

    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>> {
        self.typed_array(key, "an array of strings", MetaValue::as_str)
    }

    /// An array of any integer type whose values fit i32.
    pub fn get_i32_array(&self, key: &str) -> Result<Vec<i32>> {
        self.typed_array(key, "an array of i32", MetaValue::as_i32)
    }

    pub fn get_f32_array(&self, key: &str) -> Result<Vec<f32>> {
        self.typed_array(key, "an array of floats", MetaValue::as_f32)
    }

    // The `opt_` getters read optional settings: `None` when the key is absent or holds a value
    // of another type, so a file with an odd optional field still loads with the default.

    pub fn opt_str(&self, key: &str) -> Option<&str> {
        self.get(key)?.as_str()
    }

    pub fn opt_u64(&self, key: &str) -> Option<u64> {
        self.get(key)?.as_u64()
    }

    pub fn opt_f32(&self, key: &str) -> Option<f32> {
        self.get(key)?.as_f32()
    }

    pub fn opt_bool(&self, key: &str) -> Option<bool> {
        self.get(key)?.as_bool()
    }

    pub fn opt_str_array(&self, key: &str) -> Option<Vec<&str>> {
        self.get_str_array(key).ok()
    }

    pub fn opt_i32_array(&self, key: &str) -> Option<Vec<i32>> {
        self.get_i32_array(key).ok()
    }

    pub fn opt_f32_array(&self, key: &str) -> Option<Vec<f32>> {
        self.get_f32_array(key).ok()
    }
}

fn describe(value: &MetaValue) -> String {
    match value {
        MetaValue::Array(items) => match items.first() {
            Some(first) => format!("an array of {} {}", items.len(), first.type_name()),
            None => "an empty array".into(),
        },
        other => other.type_name().into(),
    }
}

fn align_up(pos: u64, alignment: u64) -> u64 {
    pos.div_ceil(alignment) * alignment
}

/// A cursor over the file; `context` names what is being read, for error messages.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
    context: String,
}

impl<'a> Reader<'a> {
    fn error(&self, message: impl std::fmt::Display) -> ModelError {
        ModelError::format(self.path, format!("{}: {message}", self.context))
    }

    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(ModelError::format(
                self.path,
                format!(
                    "truncated while reading {} (need {n} bytes at offset {}, file has {})",
                    self.context,
                    self.pos,
                    self.bytes.len()
                ),
            ));
        }
        let out = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.take(N)?.try_into().expect("took N bytes"))
    }

    fn u32(&mut self) -> Result<u32> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64> {
        self.array().map(u64::from_le_bytes)
    }

    /// Rejects `count` items of at least `min_size` bytes each when the rest of the file could
    /// not hold them, before anything is allocated for them.
    fn check_count(&self, count: u64, min_size: u64, what: &str) -> Result<()> {
        if count.saturating_mul(min_size) > self.remaining() as u64 {
            return Err(self.error(format!(
                "{count} {what} cannot fit in the {} bytes left",
                self.remaining()
            )));
        }
        Ok(())
    }

    fn string(&mut self) -> Result<String> {
        let len = self.u64()?;
        let bytes = self.take(usize::try_from(len).unwrap_or(usize::MAX))?;
        String::from_utf8(bytes.to_vec()).map_err(|_| self.error("string is not valid UTF-8"))
    }

    fn value(&mut self, ty: u32, depth: usize) -> Result<MetaValue> {
        Ok(match ty {
            0 => MetaValue::U8(self.array::<1>()?[0]),
            1 => MetaValue::I8(self.array::<1>()?[0] as i8),
            2 => MetaValue::U16(u16::from_le_bytes(self.array()?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.array()?)),
            4 => MetaValue::U32(self.u32()?),
            5 => MetaValue::I32(i32::from_le_bytes(self.array()?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.array()?)),
            7 => match self.array::<1>()?[0] {
                0 => MetaValue::Bool(false),
                1 => MetaValue::Bool(true),
                b => return Err(self.error(format!("invalid bool byte {b}"))),
            },
            8 => MetaValue::String(self.string()?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.error(format!("arrays nested deeper than {MAX_ARRAY_DEPTH}")));
                }
                let item_ty = self.u32()?;
                let count = self.u64()?;
                let min_size = match item_ty {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    other => return Err(self.error(format!("unknown array item type {other}"))),
                };
                self.check_count(count, min_size, "array items")?;
                let mut items = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    items.push(self.value(item_ty, depth + 1)?);
                }
                MetaValue::Array(items)
            }
            10 => MetaValue::U64(self.u64()?),
            11 => MetaValue::I64(i64::from_le_bytes(self.array()?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.array()?)),
            other => return Err(self.error(format!("unknown value type {other}"))),
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A minimal GGUF writer for building test files.
    pub(crate) struct Writer {
        pub version: u32,
        pub alignment: u64,
        pub kvs: Vec<(String, MetaValue)>,
        /// Name, dims, type id, data.
        pub tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
    }

    impl Writer {
        pub fn new() -> Self {
            Writer {
                version: 3,
                alignment: DEFAULT_ALIGNMENT,
                kvs: Vec::new(),
                tensors: Vec::new(),
            }
        }

        pub fn kv(mut self, key: &str, value: MetaValue) -> Self {
            self.kvs.push((key.into(), value));
            self
        }

        pub fn tensor(mut self, name: &str, dims: &[u64], ty: GgmlType, data: Vec<u8>) -> Self {
            self.tensors
                .push((name.into(), dims.to_vec(), ty.id(), data));
            self
        }

        fn type_id(v: &MetaValue) -> u32 {
            match v {
                MetaValue::U8(_) => 0,
                MetaValue::I8(_) => 1,
                MetaValue::U16(_) => 2,
                MetaValue::I16(_) => 3,
                MetaValue::U32(_) => 4,
                MetaValue::I32(_) => 5,
                MetaValue::F32(_) => 6,
                MetaValue::Bool(_) => 7,
                MetaValue::String(_) => 8,
                MetaValue::Array(_) => 9,
                MetaValue::U64(_) => 10,
                MetaValue::I64(_) => 11,
                MetaValue::F64(_) => 12,
            }
        }

        fn string(out: &mut Vec<u8>, s: &str) {
            out.extend((s.len() as u64).to_le_bytes());
            out.extend(s.as_bytes());
        }

        fn value(out: &mut Vec<u8>, v: &MetaValue) {
            match v {
                MetaValue::U8(x) => out.push(*x),
                MetaValue::I8(x) => out.push(*x as u8),
                MetaValue::U16(x) => out.extend(x.to_le_bytes()),
                MetaValue::I16(x) => out.extend(x.to_le_bytes()),
                MetaValue::U32(x) => out.extend(x.to_le_bytes()),
                MetaValue::I32(x) => out.extend(x.to_le_bytes()),
                MetaValue::U64(x) => out.extend(x.to_le_bytes()),
                MetaValue::I64(x) => out.extend(x.to_le_bytes()),
                MetaValue::F32(x) => out.extend(x.to_le_bytes()),
                MetaValue::F64(x) => out.extend(x.to_le_bytes()),
                MetaValue::Bool(x) => out.push(*x as u8),
                MetaValue::String(s) => Self::string(out, s),
                MetaValue::Array(items) => {
                    // An empty array's item type is arbitrary; u8 is what writers commonly use.
                    out.extend(items.first().map_or(0, Self::type_id).to_le_bytes());
                    out.extend((items.len() as u64).to_le_bytes());
                    items.iter().for_each(|i| Self::value(out, i));
                }
            }
        }

        pub fn bytes(&self) -> Vec<u8> {
            let mut out = MAGIC.to_vec();
            out.extend(self.version.to_le_bytes());
            out.extend((self.tensors.len() as u64).to_le_bytes());
            out.extend((self.kvs.len() as u64).to_le_bytes());
            for (k, v) in &self.kvs {
                Self::string(&mut out, k);
                out.extend(Self::type_id(v).to_le_bytes());
                Self::value(&mut out, v);
            }
            let mut offset = 0u64;
            let mut offsets = Vec::new();
            for (name, dims, ty, data) in &self.tensors {
                Self::string(&mut out, name);
                out.extend((dims.len() as u32).to_le_bytes());
                dims.iter().for_each(|d| out.extend(d.to_le_bytes()));
                out.extend(ty.to_le_bytes());
                out.extend(offset.to_le_bytes());
                offsets.push(offset);
                offset = align_up(offset + data.len() as u64, self.alignment);
            }
            for ((_, _, _, data), offset) in self.tensors.iter().zip(offsets) {
                let start = align_up(out.len() as u64, self.alignment);
                let start = if offset == 0 {
                    start
                } else {
                    start.max(offset)
                };
                out.resize(start as usize, 0);
                out.extend(data);
            }
            out
        }

        pub fn write(&self, name: &str) -> PathBuf {
            write_temp(name, &self.bytes())
        }

        pub fn open(&self, name: &str) -> Result<GgufFile> {
            open_bytes(name, &self.bytes())
        }
    }

    /// Opens `bytes` as a file; the file is unlinked once mapped so tests leave nothing behind.
    pub(crate) fn open_bytes(name: &str, bytes: &[u8]) -> Result<GgufFile> {
        let path = write_temp(name, bytes);
        let result = GgufFile::open(&path);
        std::fs::remove_file(&path).unwrap();
        result
    }

    pub(crate) fn write_temp(name: &str, bytes: &[u8]) -> PathBuf {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!("marlin-gguf-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!("{n}-{name}.gguf"));
        std::fs::write(&path, bytes).unwrap();
        path
    }

    fn s(v: &str) -> MetaValue {
        MetaValue::String(v.into())
    }

    fn sample() -> Writer {
        let q8: Vec<u8> = (0..2 * 34).map(|i| i as u8).collect();
        Writer::new()
            .kv("general.architecture", s("llama"))
            .kv("llama.block_count", MetaValue::U32(30))
            .kv("a.u8", MetaValue::U8(200))
            .kv("a.i8", MetaValue::I8(-5))
            .kv("a.u16", MetaValue::U16(65000))
            .kv("a.i16", MetaValue::I16(-300))
            .kv("a.i32", MetaValue::I32(-7))
            .kv("a.u64", MetaValue::U64(1 << 40))
            .kv("a.i64", MetaValue::I64(-(1 << 40)))
            .kv("a.f32", MetaValue::F32(1e-5))
            .kv("a.f64", MetaValue::F64(0.25))
            .kv("a.bool", MetaValue::Bool(true))
            .kv("a.empty", MetaValue::Array(vec![]))
            .kv(
                "a.tokens",
                MetaValue::Array(vec![s("<s>"), s("héllo"), s("")]),
            )
            .kv(
                "a.types",
                MetaValue::Array(vec![MetaValue::I32(1), MetaValue::I32(3)]),
            )
            .kv(
                "a.scores",
                MetaValue::Array(vec![MetaValue::F32(-1.5), MetaValue::F32(0.0)]),
            )
            .kv(
                "a.nested",
                MetaValue::Array(vec![MetaValue::Array(vec![MetaValue::U8(1)])]),
            )
            .tensor(
                "w.f32",
                &[3, 1],
                GgmlType::F32,
                [1.0f32, 2.0, -3.0]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            )
            .tensor("w.q8", &[32, 2], GgmlType::Q8_0, q8)
    }

    #[test]
    fn round_trip() {
        for (version, alignment) in [(3, 32), (2, 32), (3, 64)] {
            let mut w = sample();
            w.version = version;
            w.alignment = alignment;
            if alignment != DEFAULT_ALIGNMENT {
                w = w.kv("general.alignment", MetaValue::U32(alignment as u32));
            }
            let path = w.write("round-trip");
            let f = GgufFile::open(&path).unwrap();
            std::fs::remove_file(&path).unwrap();
            assert_eq!(f.version(), version);
            assert_eq!(f.alignment(), alignment);
            assert_eq!(f.data_offset() % alignment, 0);
            assert_eq!(f.path(), path);
            for (k, v) in &w.kvs {
                assert_eq!(f.get(k), Some(v), "{k}");
            }
            assert_eq!(f.architecture().unwrap(), "llama");
            assert_eq!(f.get_u64("llama.block_count").unwrap(), 30);
            assert_eq!(f.get_u64("a.u8").unwrap(), 200);
            assert_eq!(f.get_u64("a.u64").unwrap(), 1 << 40);
            assert!(f.get_u64("a.i8").is_err());
            assert_eq!(f.get_f32("a.f32").unwrap(), 1e-5);
            assert_eq!(f.get_f32("a.f64").unwrap(), 0.25);
            assert!(f.get_bool("a.bool").unwrap());
            assert_eq!(f.get_str_array("a.tokens").unwrap(), ["<s>", "héllo", ""]);
            assert_eq!(f.get_i32_array("a.types").unwrap(), [1, 3]);
            assert_eq!(f.get_f32_array("a.scores").unwrap(), [-1.5, 0.0]);
            assert!(f.get_str_array("a.empty").unwrap().is_empty());
            assert_eq!(f.opt_u64("missing"), None);
            assert_eq!(f.opt_u64("a.tokens"), None);
            assert_eq!(f.opt_str("general.architecture"), Some("llama"));
            assert_eq!(f.opt_f32("a.f32"), Some(1e-5));
            assert_eq!(f.opt_bool("a.bool"), Some(true));
            assert_eq!(f.opt_i32_array("a.types"), Some(vec![1, 3]));
            assert_eq!(f.opt_f32_array("a.tokens"), None);
            assert_eq!(f.opt_str_array("a.tokens").map(|v| v.len()), Some(3));

            let names: Vec<&str> = f.tensors().map(|t| t.name.as_str()).collect();
            assert_eq!(names, ["w.f32", "w.q8"]);
            let t = f.tensor("w.f32").unwrap();
            assert_eq!(
                (t.dims.as_slice(), t.ty, t.n_elements()),
                (&[3, 1][..], GgmlType::F32, 3)
            );
            assert_eq!(f.tensor_bytes(t), &w.tensors[0].3[..]);
            let t = f.tensor("w.q8").unwrap();
            assert_eq!(t.offset % alignment, 0);
            assert_eq!(t.n_bytes(), 68);
            assert_eq!(f.tensor_bytes(t), &w.tensors[1].3[..]);
            assert!(f.tensor("nope").is_none());
        }
    }

    fn message(result: Result<GgufFile>) -> String {
        match result {
            Err(ModelError::Format { message, .. }) => message,
            Err(other) => panic!("expected a format error, got {other}"),
            Ok(_) => panic!("expected an error"),
        }
    }

    #[test]
    fn typed_getters_name_the_key() {
        let f = sample().open("getters").unwrap();
        let err = f.get_str("llama.block_count").unwrap_err().to_string();
        assert!(
            err.contains("field `llama.block_count`: expected a string, found u32"),
            "{err}"
        );
        let err = f.get_u64("llama.context_length").unwrap_err().to_string();
        assert!(
            err.contains("field `llama.context_length`: missing"),
            "{err}"
        );
        let err = f.get_f32_array("a.tokens").unwrap_err().to_string();
        assert!(err.contains("found an array of 3 string"), "{err}");
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = sample().bytes();
        for len in 0..bytes.len() {
            let msg = message(open_bytes("truncated", &bytes[..len]));
            assert!(
                msg.contains("truncated")
                    || msg.contains("cannot fit")
                    || msg.contains("outside the file"),
                "length {len}: {msg}"
            );
        }
        let one = Writer::new().kv("general.architecture", s("llama")).bytes();
        let msg = message(open_bytes("cut", &one[..one.len() - 2]));
        assert!(
            msg.starts_with("truncated while reading metadata key #0 (`general.architecture`)"),
            "{msg}"
        );
    }

    /// Offset of the first metadata key's length field: after magic, version and the two counts.
    const FIRST_KEY_LEN_AT: usize = 24;

    #[test]
    fn absurd_counts_are_rejected_before_allocating() {
        let good = sample().bytes();

        let mut b = good.clone();
        b[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(message(open_bytes("kv", &b)).contains("metadata entries cannot fit"));

        let mut b = good.clone();
        b[8..16].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
        assert!(message(open_bytes("tensors", &b)).contains("tensors cannot fit"));

        let mut b = good.clone();
        b[FIRST_KEY_LEN_AT..FIRST_KEY_LEN_AT + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        let msg = message(open_bytes("string", &b));
        assert!(
            msg.starts_with(
                "truncated while reading metadata key #0 (need 18446744073709551615 bytes"
            ),
            "{msg}"
        );

        let w = Writer::new().kv("big", MetaValue::Array(vec![MetaValue::U32(1)]));
        let mut b = w.bytes();
        let count_at = b.len() - 4 - 8;
        b[count_at..count_at + 8].copy_from_slice(&(1u64 << 62).to_le_bytes());
        let msg = message(open_bytes("array", &b));
        assert!(
            msg.contains("metadata key #0 (`big`)") && msg.contains("array items cannot fit"),
            "{msg}"
        );
    }

    #[test]
    fn malformed_files_are_rejected_with_names() {
        let mut b = sample().bytes();
        b[0] = b'X';
        assert!(message(open_bytes("magic", &b)).contains("bad magic"));

        for version in [1u32, 4, 3u32.swap_bytes()] {
            let mut w = sample();
            w.version = version;
            let msg = message(w.open("version"));
            assert!(
                msg.contains("version") || msg.contains("big-endian"),
                "{msg}"
            );
        }

        let mut w = sample();
        w.tensors[1].2 = 23;
        assert_eq!(
            message(w.open("type")),
            "unsupported tensor type 23 for `w.q8`"
        );

        let mut w = sample();
        w.tensors[1].1 = vec![32, 3];
        let msg = message(w.open("outside"));
        assert!(
            msg.starts_with("tensor `w.q8` data [") && msg.contains("lies outside the file"),
            "{msg}"
        );

        let mut w = sample();
        w.tensors[1].1 = vec![16, 4];
        let msg = message(w.open("rows"));
        assert!(msg.contains("not a whole number of Q8_0 blocks"), "{msg}");

        let mut w = sample();
        w.tensors[1].1 = vec![u64::MAX, 2, 2];
        assert!(message(w.open("overflow")).contains("overflow"));

        let mut w = sample();
        w.tensors[1].0 = "w.f32".into();
        assert!(message(w.open("dup")).contains("duplicate tensor `w.f32`"));

        let w = sample().kv("a.u8", MetaValue::U8(1));
        assert!(message(w.open("dupkey")).contains("(`a.u8`): duplicate key"));

        let w = sample().kv("general.alignment", MetaValue::U32(24));
        assert!(message(w.open("align")).contains("general.alignment"));

        let w = Writer::new().kv("x", MetaValue::Bool(true));
        let mut b = w.bytes();
        *b.last_mut().unwrap() = 2;
        assert!(message(open_bytes("bool", &b)).contains("invalid bool"));

        let nested = (0..6).fold(MetaValue::U8(0), |v, _| MetaValue::Array(vec![v]));
        let w = Writer::new().kv("deep", nested);
        assert!(message(w.open("deep")).contains("nested deeper"));

        let err = GgufFile::open(Path::new("/nonexistent/x.gguf")).unwrap_err();
        assert!(matches!(err, ModelError::Io { .. }));
    }

    #[test]
    fn random_corruption_never_panics() {
        let good = sample().bytes();
        // A fixed xorshift sequence keeps failures reproducible.
        let mut state = 0x9e3779b97f4a7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..300 {
            let mut b = good.clone();
            for _ in 0..1 + next() % 4 {
                let at = (next() % b.len() as u64) as usize;
                b[at] = next() as u8;
            }
            if let Ok(f) = open_bytes("fuzz", &b) {
                f.tensors()
                    .for_each(|t| assert_eq!(f.tensor_bytes(t).len(), t.n_bytes()));
            }
        }
    }
}
