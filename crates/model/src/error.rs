use std::path::PathBuf;

/// Everything that can go wrong while finding, reading or running a model. Load errors name the
/// file and, inside it, the tensor or field.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file was read but its contents are wrong; `message` names the tensor or field.
    #[error("{}: {message}", path.display())]
    Format { path: PathBuf, message: String },
    #[error("unsupported architecture `{name}`; supported: {supported}")]
    Architecture { name: String, supported: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error(transparent)]
    Kernel(#[from] marlin_kernels::KernelError),
    #[error(transparent)]
    Quant(#[from] marlin_quant::QuantError),
}

impl ModelError {
    pub fn format(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        ModelError::Format {
            path: path.into(),
            message: message.into(),
        }
    }
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T> = std::result::Result<T, ModelError>;
