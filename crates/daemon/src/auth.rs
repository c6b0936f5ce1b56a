//! Access over TCP: TLS (rustls) and bearer tokens. The Unix socket needs neither (its file
//! mode is the access control); a TCP listener serves only TLS, and every request on it must
//! carry `Authorization: Bearer <token>` with a token created through the API
//! (`vanguard token create`), or it gets 401 and nothing else.
//!
//! Tokens are 32 random bytes (getrandom), shown once as `vgt_<64 hex digits>`; the daemon
//! stores only their SHA-256, in the state database, under a name used to list and revoke them.

use crate::manager::{Failure, Manager};
use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use std::io;
use std::path::Path;
use std::sync::Arc;

/// A new token's secret: `vgt_` and 64 hex digits from the kernel's random source.
pub fn new_secret() -> io::Result<String> {
    let mut bytes = [0u8; 32];
    let mut filled = 0;
    while filled < bytes.len() {
        let rest = &mut bytes[filled..];
        // SAFETY: getrandom writes at most `rest.len()` bytes into `rest`, exclusively
        // borrowed for the call.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        filled += usize::try_from(n).unwrap_or(0);
    }
    Ok(format!("vgt_{}", hex(&bytes)))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What is stored for a token: its SHA-256 in hex.
pub fn digest(secret: &str) -> String {
    hex(&Sha256::digest(secret.as_bytes()))
}

/// Equal without an early exit (the time does not say how much of a guess was right).
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The middleware of the TCP listener: a valid bearer token, or 401.
pub async fn require_token(
    State(manager): State<Arc<Manager>>,
    request: Request,
    next: Next,
) -> Response {
    let presented = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(presented) = presented else {
        return Failure::unauthorized("this listener needs `Authorization: Bearer <token>`")
            .into_response();
    };
    let wanted = digest(presented);
    let known = manager.token_digests();
    if !known.iter().any(|d| same(d, &wanted)) {
        return Failure::unauthorized("the token is not valid (unknown or revoked)")
            .into_response();
    }
    next.run(request).await
}

/// The TLS configuration of a listener from PEM files (a certificate chain and its key).
pub fn server_config(cert: &Path, key: &Path) -> io::Result<Arc<rustls::ServerConfig>> {
    let read = |path: &Path| {
        std::fs::read(path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
    };
    let certs: Vec<_> = rustls_pemfile::certs(&mut read(cert)?.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| io::Error::other(format!("{}: {e}", cert.display())))?;
    if certs.is_empty() {
        return Err(io::Error::other(format!("{}: no certificate in it", cert.display())));
    }
    let key_der = rustls_pemfile::private_key(&mut read(key)?.as_slice())
        .map_err(|e| io::Error::other(format!("{}: {e}", key.display())))?
        .ok_or_else(|| io::Error::other(format!("{}: no private key in it", key.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| io::Error::other(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| io::Error::other(format!("{} and {}: {e}", cert.display(), key.display())))?;
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_random_and_digests_fixed() {
        let (a, b) = (new_secret().unwrap(), new_secret().unwrap());
        assert_ne!(a, b);
        assert!(a.starts_with("vgt_") && a.len() == 68, "{a}");
        assert_eq!(
            digest("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(same(&digest(&a), &digest(&a)));
        assert!(!same(&digest(&a), &digest(&b)));
        assert!(!same("ab", "abc"));
    }
}
