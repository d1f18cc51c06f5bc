//! What several test files share: the default model, which `marlin pull` fetches.

use std::path::PathBuf;

/// The pulled default model's GGUF, or a failure that says to pull it.
pub fn default_model() -> PathBuf {
    let home = std::env::var_os("MARLIN_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache/marlin")
        });
    let path = home.join("models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.exists(),
        "run `marlin pull` first (default model not found at {})",
        path.display()
    );
    path
}
