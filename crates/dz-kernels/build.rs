//! Compiles `kernels/<codec>/<codec>.cu` to PTX with nvcc, only under the `cuda` feature (without it this
//! script does nothing, and the crate needs no CUDA toolkit).
//!
//! nvcc is `$NVCC`, else `$CUDA_HOME/bin/nvcc`, else `nvcc` on the PATH; the target is
//! `sm_$CUDA_COMPUTE_CAP` (default 90). The launch shape of `src/params.rs` is passed as `-DDZ_*`, so the
//! kernels and the host code agree on it. The five codec families, the tensor-core family and the v4
//! family compile in parallel.
//! `DZ_KERNELS_LINEINFO=1` adds `-lineinfo` (source lines in compute-sanitizer and profiler reports); it
//! doubles the PTX (about 36 MB instead of 18 MB embedded), so it is off by default.
//! nvcc must be 13.0.x for the H200 machine's driver (PTX of newer nvcc fails to load there with
//! `CUDA_ERROR_UNSUPPORTED_PTX_VERSION`): another version is a build warning.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// The launch shape (shared with lib.rs); not every constant is needed here.
#[allow(dead_code)]
mod params {
    include!("src/params.rs");
}
use params::{CHUNK, M_TILES, ROWS_PER_WARP, WARPS};

/// The codec families: `kernels/<name>/<name>.cu` becomes `$OUT_DIR/<name>.ptx`.
const FAMILIES: [&str; 8] = [
    "quant", "sparse24", "sparse", "sign1", "dense", "tc", "v4", "rows",
];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/params.rs");
    println!("cargo:rerun-if-changed=kernels");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=DZ_KERNELS_LINEINFO");
    for entry in walk(Path::new("kernels")) {
        println!("cargo:rerun-if-changed={}", entry.display());
    }

    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = nvcc();
    let version = nvcc_version(&nvcc);
    if !version.contains("release 13.0") {
        println!(
            "cargo:warning=dz-kernels: nvcc is {version:?}; the H200 machine's driver loads PTX of nvcc \
             13.0.x only (newer PTX fails with CUDA_ERROR_UNSUPPORTED_PTX_VERSION)"
        );
    }
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".to_string());
    let cap = cap.trim().trim_start_matches("sm_").to_string();
    println!("cargo:rustc-env=DZ_NVCC_VERSION={version}");
    println!("cargo:rustc-env=DZ_CUDA_COMPUTE_CAP={cap}");

    let lineinfo = std::env::var("DZ_KERNELS_LINEINFO").is_ok_and(|v| v == "1");
    println!(
        "cargo:rustc-env=DZ_KERNELS_LINEINFO={}",
        if lineinfo { "yes" } else { "no" }
    );
    let defines = [
        format!("-DDZ_WARPS={WARPS}"),
        format!("-DDZ_ROWS_PER_WARP={ROWS_PER_WARP}"),
        format!("-DDZ_CHUNK={CHUNK}"),
        format!("-DDZ_MT_SMALL={}", M_TILES[0]),
        format!("-DDZ_MT_LARGE={}", M_TILES[1]),
    ];
    let jobs: Vec<(&str, Child)> = FAMILIES
        .iter()
        .map(|&family| {
            let child = Command::new(&nvcc)
                .args(["--ptx", &format!("-arch=sm_{cap}"), "-O3", "-std=c++17"])
                .args(lineinfo.then_some("-lineinfo"))
                .arg("-Ikernels/common")
                .args(&defines)
                .arg("-o")
                .arg(out.join(format!("{family}.ptx")))
                .arg(format!("kernels/{family}/{family}.cu"))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("dz-kernels: cannot run {nvcc:?}: {e}"));
            (family, child)
        })
        .collect();
    let mut failed = Vec::new();
    for (family, child) in jobs {
        let result = child
            .wait_with_output()
            .unwrap_or_else(|e| panic!("dz-kernels: waiting for nvcc ({family}): {e}"));
        let stderr = String::from_utf8_lossy(&result.stderr);
        for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
            println!("cargo:warning=nvcc ({family}): {line}");
        }
        if !result.status.success() {
            failed.push(format!("{family}: {}\n{stderr}", result.status));
        }
    }
    assert!(
        failed.is_empty(),
        "dz-kernels: nvcc failed:\n{}",
        failed.join("\n")
    );
}

/// `$NVCC`, else `$CUDA_HOME/bin/nvcc` if it exists, else `nvcc`.
fn nvcc() -> PathBuf {
    if let Some(p) = std::env::var_os("NVCC") {
        return PathBuf::from(p);
    }
    if let Some(home) = std::env::var_os("CUDA_HOME") {
        let p = PathBuf::from(home).join("bin/nvcc");
        if p.exists() {
            return p;
        }
    }
    PathBuf::from("nvcc")
}

/// The `release ...` line of `nvcc --version`.
fn nvcc_version(nvcc: &Path) -> String {
    let out = Command::new(nvcc)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "dz-kernels: the `cuda` feature needs nvcc 13.0 ({nvcc:?}: {e}); \
             see /work/shared/gpu/README.md"
            )
        });
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.contains("release"))
        .unwrap_or("unknown")
        .trim()
        .to_string()
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}
