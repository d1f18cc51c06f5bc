//! NVRTC compilation of the kernel sources for the device's architecture, cached on disk.
//!
//! The cache lives in `$MARLIN_HOME/kernels` (default `~/.cache/marlin/kernels`); a file's name is
//! a hash of the source, the architecture, the NVRTC version and the options, so editing a kernel,
//! changing GPU or upgrading NVRTC compiles afresh, and stale files are never read.

use cudarc::nvrtc::sys;
use std::ffi::{CStr, CString};
use std::path::PathBuf;

/// The compiled module: a CUBIN for `sm_{major}{minor}`, and whether it came from the cache.
pub(crate) fn cubin(source: &str, arch: (i32, i32)) -> Result<(Vec<u8>, bool), String> {
    let version = nvrtc_version()?;
    let options = [
        // sm_90a: Hopper's architecture-specific instructions (wgmma) for the prefill kernel.
        format!(
            "--gpu-architecture=sm_{}{}{}",
            arch.0,
            arch.1,
            if arch == (9, 0) { "a" } else { "" }
        ),
        "--std=c++17".to_string(),
    ];
    let key = {
        let mut h = Fnv::default();
        h.write(source.as_bytes());
        h.write(format!("{arch:?} nvrtc {version:?} {options:?}").as_bytes());
        h.finish()
    };
    let path = cache_dir().map(|d| d.join(format!("{key:032x}.cubin")));
    if let Some(p) = &path {
        if let Ok(bytes) = std::fs::read(p) {
            if !bytes.is_empty() {
                return Ok((bytes, true));
            }
        }
    }
    let bytes = compile(source, &options)?;
    if let Some(p) = &path {
        // Best effort, written whole then renamed so a concurrent reader never sees half a file.
        if let Some(dir) = p.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let tmp = p.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::write(&tmp, &bytes).is_ok() {
            let _ = std::fs::rename(&tmp, p);
        }
    }
    Ok((bytes, false))
}

/// `$MARLIN_HOME/kernels`, `$HOME/.cache/marlin/kernels`, or nowhere (no cache).
pub(crate) fn cache_dir() -> Option<PathBuf> {
    let home = match std::env::var_os("MARLIN_HOME") {
        Some(h) if !h.is_empty() => PathBuf::from(h),
        _ => PathBuf::from(std::env::var_os("HOME")?).join(".cache/marlin"),
    };
    Some(home.join("kernels"))
}

fn nvrtc_version() -> Result<(i32, i32), String> {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: two out-parameters.
    check(
        unsafe { sys::nvrtcVersion(&mut major, &mut minor) },
        "nvrtcVersion",
    )?;
    Ok((major, minor))
}

fn check(r: sys::nvrtcResult, what: &str) -> Result<(), String> {
    if r == sys::nvrtcResult::NVRTC_SUCCESS {
        Ok(())
    } else {
        Err(format!("{what}: {r:?}"))
    }
}

fn compile(source: &str, options: &[String]) -> Result<Vec<u8>, String> {
    let src = CString::new(source).map_err(|e| e.to_string())?;
    let name = CString::new("marlin.cu").unwrap();
    let opts: Vec<CString> = options
        .iter()
        .map(|o| CString::new(o.as_str()).unwrap())
        .collect();
    let opt_ptrs: Vec<*const std::ffi::c_char> = opts.iter().map(|o| o.as_ptr()).collect();
    let mut prog: sys::nvrtcProgram = std::ptr::null_mut();
    // SAFETY: every pointer outlives the calls; the program is destroyed on every path below.
    unsafe {
        check(
            sys::nvrtcCreateProgram(
                &mut prog,
                src.as_ptr(),
                name.as_ptr(),
                0,
                std::ptr::null(),
                std::ptr::null(),
            ),
            "nvrtcCreateProgram",
        )?;
        let result = (|| {
            let r = sys::nvrtcCompileProgram(prog, opt_ptrs.len() as i32, opt_ptrs.as_ptr());
            if r != sys::nvrtcResult::NVRTC_SUCCESS {
                let mut size = 0usize;
                sys::nvrtcGetProgramLogSize(prog, &mut size);
                let mut log = vec![0u8; size.max(1)];
                sys::nvrtcGetProgramLog(prog, log.as_mut_ptr() as *mut _);
                let log = CStr::from_bytes_until_nul(&log)
                    .map(|c| c.to_string_lossy().into_owned())
                    .unwrap_or_default();
                return Err(format!("NVRTC {r:?} ({options:?}):\n{log}"));
            }
            let mut size = 0usize;
            check(sys::nvrtcGetCUBINSize(prog, &mut size), "nvrtcGetCUBINSize")?;
            let mut out = vec![0u8; size];
            check(
                sys::nvrtcGetCUBIN(prog, out.as_mut_ptr() as *mut _),
                "nvrtcGetCUBIN",
            )?;
            Ok(out)
        })();
        sys::nvrtcDestroyProgram(&mut prog);
        result
    }
}

/// 128-bit FNV-1a: stable across Rust releases, unlike `DefaultHasher`.
struct Fnv(u128);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0x6c62272e07bb014262b821756295c58d)
    }
}

impl Fnv {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= b as u128;
            self.0 = self.0.wrapping_mul(0x0000000001000000000000000000013B);
        }
    }
    fn finish(&self) -> u128 {
        self.0
    }
}
