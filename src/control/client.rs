//! The client of the control API, for the CLI and for scripts written in Rust: one request per
//! connection, JSON in and out, and errors that say what to do.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use async_io::Async;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use serde_json::Value;
use smol_hyper::rt::FuturesIo;

/// Why a request to the control API failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No socket file: no gateway runs with this state directory (or control.socket).
    #[error("no gateway is running: there is no control socket {0}; start one with `hubnat run`, or give the running gateway's socket with --control PATH (or its --config)")]
    NotRunning(PathBuf),
    /// A socket file nobody listens on: the gateway stopped without removing it.
    #[error("no gateway is running: nothing answers on the control socket {0} (a gateway stopped without removing it); start one with `hubnat run`")]
    Refused(PathBuf),
    /// The socket file's permissions keep this user out.
    #[error("permission denied on the control socket {path} (owned by uid {owner}, you are uid {me}); run this as its owner or as root (e.g. with sudo)")]
    Permission {
        /// The socket.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// This process's uid.
        me: u32,
    },
    /// The connection failed otherwise.
    #[error("cannot talk to the gateway on {path}: {source}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// HTTP failed (the gateway closed the connection, …).
    #[error("the gateway on {path} did not answer properly: {reason}")]
    Http {
        /// The socket.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The gateway answered with an error.
    #[error("{reason}")]
    Api {
        /// The HTTP status.
        status: u16,
        /// The key the error is about, if any.
        key: Option<String>,
        /// Why.
        reason: String,
    },
}

/// A client of the control socket at one path.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    /// A client of the socket at `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Client {
            socket: socket.into(),
        }
    }

    /// The socket's path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `GET path`.
    pub fn get(&self, path: &str) -> Result<Value, ClientError> {
        self.request(Method::GET, path, None)
    }

    /// Sends one request and waits for the answer (blocking). A non-2xx answer becomes
    /// [`ClientError::Api`] with the error's key and reason.
    pub fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, ClientError> {
        let (status, text) = self.raw(method, path, body)?;
        let value: Value = serde_json::from_slice(&text).map_err(|e| ClientError::Http {
            path: self.socket.clone(),
            reason: format!("the answer is not JSON: {e}"),
        })?;
        if status.is_success() {
            return Ok(value);
        }
        let e = &value["error"];
        Err(ClientError::Api {
            status: status.as_u16(),
            key: e["key"].as_str().map(str::to_string),
            reason: e["reason"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| format!("the gateway answered {status}")),
        })
    }

    /// Sends one request and returns the status and the body as they came.
    pub fn raw(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        async_io::block_on(self.send(method, path, body))
    }

    fn connect_error(&self, e: io::Error) -> ClientError {
        let path = self.socket.clone();
        match e.kind() {
            io::ErrorKind::NotFound => ClientError::NotRunning(path),
            io::ErrorKind::ConnectionRefused => ClientError::Refused(path),
            io::ErrorKind::PermissionDenied => ClientError::Permission {
                owner: std::fs::metadata(&path).map(|m| m.uid()).unwrap_or(0),
                // SAFETY: geteuid has no preconditions and cannot fail.
                me: unsafe { libc::geteuid() },
                path,
            },
            _ => ClientError::Io { path, source: e },
        }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let stream = Async::<UnixStream>::connect(&self.socket)
            .await
            .map_err(|e| self.connect_error(e))?;
        let http = |reason: String| ClientError::Http {
            path: self.socket.clone(),
            reason,
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(FuturesIo::new(stream))
            .await
            .map_err(|e| http(e.to_string()))?;
        let bytes = body
            .map(|b| serde_json::to_vec(b).unwrap_or_default())
            .unwrap_or_default();
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "hubnat");
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(bytes)))
            .map_err(|e| http(e.to_string()))?;
        let exchange = async {
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| http(e.to_string()))?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| http(e.to_string()))?
                .to_bytes();
            Ok((status, body))
        };
        let driver = async {
            match conn.await {
                Ok(()) => Err(http("the connection closed before the answer".into())),
                Err(e) => Err(http(e.to_string())),
            }
        };
        futures_lite::future::or(exchange, driver).await
    }
}
