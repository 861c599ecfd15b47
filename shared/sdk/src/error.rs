//! The error a plugin returns, and how it becomes a gRPC status.

use tonic::{Code, Status};

/// Why a plugin call failed. A *task* that fails is not an error: return a
/// [`Resource`](crate::proto::admin::Resource) with phase `FAILED` (see
/// [`crate::resource`]). Use this for calls that cannot be answered.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// The request is malformed: a missing field, an option of the wrong type.
    #[error("{0}")]
    InvalidArgument(String),
    /// A precondition does not hold (for example a sync task type sent to CreateTask).
    #[error("{0}")]
    FailedPrecondition(String),
    /// Something the request names does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A credential or setting the plugin needs is missing on the service side.
    #[error("{0}")]
    Unconfigured(String),
    /// A dependency is temporarily unreachable; the caller may retry.
    #[error("{0}")]
    Unavailable(String),
    /// The plugin does not implement this method.
    #[error("{0}")]
    Unimplemented(String),
    /// A status to pass through unchanged (for example from an upstream gRPC call).
    #[error("{}", .0.message())]
    Status(Status),
    /// Anything else; its text reaches the caller, as flytekit's does.
    #[error("{0}")]
    Internal(String),
}

impl PluginError {
    /// The gRPC code this error is answered with.
    pub fn code(&self) -> Code {
        match self {
            Self::InvalidArgument(_) => Code::InvalidArgument,
            Self::FailedPrecondition(_) | Self::Unconfigured(_) => Code::FailedPrecondition,
            Self::NotFound(_) => Code::NotFound,
            Self::Unavailable(_) => Code::Unavailable,
            Self::Unimplemented(_) => Code::Unimplemented,
            Self::Status(s) => s.code(),
            Self::Internal(_) => Code::Internal,
        }
    }
}

impl From<PluginError> for Status {
    fn from(e: PluginError) -> Self {
        match e {
            PluginError::Status(s) => s,
            other => Status::new(other.code(), crate::wire::bounded_message(other.to_string())),
        }
    }
}

impl From<Status> for PluginError {
    fn from(s: Status) -> Self {
        Self::Status(s)
    }
}

/// The `error_code` label flytekit puts on failed requests: an HTTP status number as text.
pub(crate) fn http_code_label(code: Code) -> &'static str {
    match code {
        Code::Ok => "200",
        Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => "400",
        Code::Unauthenticated => "401",
        Code::PermissionDenied => "403",
        Code::NotFound => "404",
        Code::AlreadyExists | Code::Aborted => "409",
        Code::ResourceExhausted => "429",
        Code::Cancelled => "499",
        Code::Unimplemented => "501",
        Code::Unavailable => "503",
        Code::DeadlineExceeded => "504",
        Code::Unknown | Code::Internal | Code::DataLoss => "500",
    }
}
