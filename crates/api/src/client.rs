//! A client for the daemon's API on its Unix socket (HTTP/1.1 through hyper), used by the CLI
//! and the tests.

use crate::ApiError;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::path::{Path, PathBuf};
use tokio::net::UnixStream;

/// Why a request did not give the answer wanted.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The daemon's socket cannot be reached.
    #[error("cannot reach the daemon at {path}: {source} (is `vanguard serve` running?)")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP exchange failed.
    #[error("talking to the daemon: {0}")]
    Http(String),
    /// The daemon answered with an error.
    #[error("{}", match &.error.field { Some(f) => format!("{f}: {}", .error.error), None => .error.error.clone() })]
    Api {
        /// The HTTP status.
        status: u16,
        /// The daemon's explanation.
        error: ApiError,
    },
    /// The answer is not what the API documents.
    #[error("unexpected answer from the daemon: {0}")]
    Decode(String),
}

/// Where the daemon is, and how to reach it.
#[derive(Clone)]
enum Transport {
    Unix(PathBuf),
    Tls {
        addr: String,
        server_name: rustls::pki_types::ServerName<'static>,
        connector: tokio_rustls::TlsConnector,
    },
}

/// A stream to the daemon, plain or TLS.
/// A connection to the daemon, plain or TLS.
pub trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// The daemon, on its Unix socket or a TLS listener.
#[derive(Clone)]
pub struct Client {
    transport: Transport,
    token: Option<String>,
}

impl Client {
    /// A client for the daemon listening on `socket`.
    pub fn unix(socket: impl AsRef<Path>) -> Client {
        Client { transport: Transport::Unix(socket.as_ref().to_path_buf()), token: None }
    }

    /// A client for a TLS listener at `addr` (`host:port`) whose certificate is signed by (or
    /// is) the PEM certificate `ca`, sending `token` as the bearer token.
    pub fn tls(addr: &str, ca: &Path, token: Option<String>) -> Result<Client, ClientError> {
        let pem = std::fs::read(ca)
            .map_err(|e| ClientError::Http(format!("TLS setup: {}: {e}", ca.display())))?;
        Client::tls_pem(addr, &pem, &ca.display().to_string(), token)
    }

    /// As [`Client::tls`], with the certificate authority's PEM text itself; `label` names it
    /// in errors.
    pub fn tls_pem(
        addr: &str,
        pem: &[u8],
        label: &str,
        token: Option<String>,
    ) -> Result<Client, ClientError> {
        let bad = |e: String| ClientError::Http(format!("TLS setup: {e}"));
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut &pem[..]) {
            let cert = cert.map_err(|e| bad(format!("{label}: {e}")))?;
            roots.add(cert).map_err(|e| bad(format!("{label}: {e}")))?;
        }
        if roots.is_empty() {
            return Err(bad(format!("{label}: no certificate in it")));
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h).trim_matches(['[', ']']);
        let server_name = rustls::pki_types::ServerName::try_from(host.to_string())
            .map_err(|e| bad(format!("'{host}': {e}")))?;
        Ok(Client {
            transport: Transport::Tls {
                addr: addr.to_string(),
                server_name,
                connector: tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)),
            },
            token,
        })
    }

    /// Where the daemon is, in words.
    pub fn target(&self) -> String {
        match &self.transport {
            Transport::Unix(path) => path.display().to_string(),
            Transport::Tls { addr, .. } => format!("tcp:{addr}"),
        }
    }

    async fn connect(&self) -> Result<Box<dyn Io>, ClientError> {
        match &self.transport {
            Transport::Unix(path) => {
                let stream = UnixStream::connect(path)
                    .await
                    .map_err(|source| ClientError::Connect { path: path.clone(), source })?;
                Ok(Box::new(stream))
            }
            Transport::Tls { addr, server_name, connector } => {
                let connect_err = |source| ClientError::Connect {
                    path: PathBuf::from(format!("tcp:{addr}")),
                    source,
                };
                let tcp =
                    tokio::net::TcpStream::connect(addr.as_str()).await.map_err(connect_err)?;
                let tls = connector
                    .connect(server_name.clone(), tcp)
                    .await
                    .map_err(|e| ClientError::Http(format!("TLS with {addr}: {e}")))?;
                Ok(Box::new(tls))
            }
        }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
        let stream = self.connect().await?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let mut request = Request::builder().method(method).uri(path).header("host", "vanguard");
        if body.is_some() {
            request = request.header("content-type", "application/json");
        }
        if let Some(token) = &self.token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ClientError::Http(e.to_string()))?;
        sender.send_request(request).await.map_err(|e| ClientError::Http(e.to_string()))
    }

    /// Sends a request; returns the status and the whole body.
    pub async fn raw(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(u16, Vec<u8>), ClientError> {
        let method =
            Method::from_bytes(method.as_bytes()).map_err(|e| ClientError::Http(e.to_string()))?;
        let response = self.send(method, path, body).await?;
        let status = response.status().as_u16();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?
            .to_bytes();
        Ok((status, bytes.to_vec()))
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, ClientError> {
        let (status, bytes) = self.raw(method.as_str(), path, body).await?;
        if !StatusCode::from_u16(status).is_ok_and(|s| s.is_success()) {
            let error = serde_json::from_slice::<ApiError>(&bytes).unwrap_or_else(|_| ApiError {
                error: format!("HTTP {status}: {}", String::from_utf8_lossy(&bytes)),
                field: None,
            });
            return Err(ClientError::Api { status, error });
        }
        let body = if bytes.is_empty() { b"null".to_vec() } else { bytes };
        serde_json::from_slice(&body).map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// `GET path`, decoded.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call(Method::GET, path, None).await
    }

    /// `POST path` with a JSON body, decoded.
    pub async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl Serialize,
    ) -> Result<T, ClientError> {
        let body = serde_json::to_vec(body).map_err(|e| ClientError::Http(e.to_string()))?;
        self.call(Method::POST, path, Some(body)).await
    }

    /// `DELETE path`.
    pub async fn delete(&self, path: &str) -> Result<(), ClientError> {
        self.call::<serde_json::Value>(Method::DELETE, path, None).await.map(|_| ())
    }

    /// `GET path` as a stream of lines, each given to `line` until it returns false or the
    /// stream ends.
    pub async fn lines(
        &self,
        path: &str,
        mut line: impl FnMut(&str) -> bool,
    ) -> Result<(), ClientError> {
        let mut pending = Vec::new();
        self.bytes(path, |data| {
            pending.extend_from_slice(data);
            while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                let text = String::from_utf8_lossy(&pending[..end]).into_owned();
                pending.drain(..=end);
                if !line(&text) {
                    return false;
                }
            }
            true
        })
        .await
    }

    /// `GET path` as a stream of bytes, each piece given to `piece` until it returns false or
    /// the stream ends.
    pub async fn bytes(
        &self,
        path: &str,
        mut piece: impl FnMut(&[u8]) -> bool,
    ) -> Result<(), ClientError> {
        let mut response = self.send(Method::GET, path, None).await?;
        let status = response.status().as_u16();
        if status != 200 {
            let body = response
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes().to_vec())
                .unwrap_or_default();
            let error = serde_json::from_slice(&body)
                .unwrap_or_else(|_| ApiError { error: format!("HTTP {status}"), field: None });
            return Err(ClientError::Api { status, error });
        }
        while let Some(frame) = response.body_mut().frame().await {
            let frame = frame.map_err(|e| ClientError::Http(e.to_string()))?;
            let Some(data) = frame.data_ref() else { continue };
            if !piece(data) {
                return Ok(());
            }
        }
        Ok(())
    }

    /// `POST path` with raw bytes; the status must be a success.
    pub async fn post_bytes(&self, path: &str, body: Vec<u8>) -> Result<(), ClientError> {
        let (status, bytes) = self.raw("POST", path, Some(body)).await?;
        if !(200..300).contains(&status) {
            let error = serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| ApiError { error: format!("HTTP {status}"), field: None });
            return Err(ClientError::Api { status, error });
        }
        Ok(())
    }

    /// Opens a websocket on `path` (a `GET` with `Upgrade: websocket` on a connection of its
    /// own, with the token if there is one). A refusal is the API's error.
    pub async fn websocket(
        &self,
        path: &str,
    ) -> Result<tokio_tungstenite::WebSocketStream<Box<dyn Io>>, ClientError> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        use tokio_tungstenite::tungstenite::Error as WsError;
        let mut request = format!("ws://vanguard{path}")
            .into_client_request()
            .map_err(|e| ClientError::Http(e.to_string()))?;
        if let Some(token) = &self.token {
            let value = format!("Bearer {token}")
                .parse()
                .map_err(|_| ClientError::Http("the token is not a valid header value".into()))?;
            request.headers_mut().insert("authorization", value);
        }
        let stream = self.connect().await?;
        match tokio_tungstenite::client_async(request, stream).await {
            Ok((socket, _)) => Ok(socket),
            Err(WsError::Http(response)) => {
                let status = response.status().as_u16();
                let body = response.body().clone().unwrap_or_default();
                let error = serde_json::from_slice(&body).unwrap_or_else(|_| ApiError {
                    error: format!("HTTP {status}: {}", String::from_utf8_lossy(&body)),
                    field: None,
                });
                Err(ClientError::Api { status, error })
            }
            Err(e) => Err(ClientError::Http(format!("websocket: {e}"))),
        }
    }
}
