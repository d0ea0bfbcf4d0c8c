//! The Kubernetes channel protocol for exec/attach over WebSocket (`v4.channel.k8s.io`,
//! `v5.channel.k8s.io`), as the API server / kubelet speak it to kubectl, client-go, kube-rs and
//! the Python client.
//!
//! Every message is one channel byte followed by data: 0 stdin, 1 stdout, 2 stderr, 3 error
//! (the final `metav1.Status` as JSON), 4 resize (`{"Width":..,"Height":..}`). v5 adds a close
//! signal: the message `[255, channel]` closes that stream (for stdin: EOF to the process).
//! Clients may send stdin as text frames (the Python client does); the first character is then
//! the channel.

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use bytes::{BufMut, Bytes, BytesMut};
use futures::{SinkExt, StreamExt};

use super::session::{ExitStatus, Session, TerminalSize};

const STDIN: u8 = 0;
const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const ERROR: u8 = 3;
const RESIZE: u8 = 4;
const CLOSE: u8 = 255;

/// The negotiated subprotocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    V4,
    V5,
}

impl Protocol {
    /// Subprotocols we accept, preferred first (for `WebSocketUpgrade::protocols`).
    pub const SUPPORTED: [&'static str; 2] = ["v5.channel.k8s.io", "v4.channel.k8s.io"];

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::V4 => "v4.channel.k8s.io",
            Protocol::V5 => "v5.channel.k8s.io",
        }
    }

    /// Picks our preferred protocol from a `Sec-WebSocket-Protocol` header value (a comma
    /// separated list; clients also send several headers, so callers may join them).
    pub fn from_header(value: &str) -> Option<Protocol> {
        let offered: Vec<&str> = value.split(',').map(str::trim).collect();
        if offered.contains(&"v5.channel.k8s.io") {
            Some(Protocol::V5)
        } else if offered.contains(&"v4.channel.k8s.io") {
            Some(Protocol::V4)
        } else {
            None
        }
    }
}

/// The final status sent on the error channel, exactly as a real API server words it.
pub fn status_json(command: &[String], exit: &ExitStatus) -> serde_json::Value {
    match exit {
        ExitStatus::Exited(0) | ExitStatus::Detached => {
            serde_json::json!({"metadata": {}, "status": "Success"})
        }
        ExitStatus::Exited(code) => serde_json::json!({
            "metadata": {},
            "status": "Failure",
            "message": format!(
                "command terminated with non-zero exit code: error executing command [{}], exit code {code}",
                command.join(" ")
            ),
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]}
        }),
        // apierrors.NewInternalError, as the kubelet's streaming server and the API server send it.
        ExitStatus::Failed(msg) => serde_json::json!({
            "metadata": {},
            "status": "Failure",
            "message": format!("Internal error occurred: {msg}"),
            "reason": "InternalError",
            "details": {"causes": [{"message": msg}]},
            "code": 500
        }),
    }
}

fn frame(channel: u8, data: &[u8]) -> Message {
    let mut b = BytesMut::with_capacity(data.len() + 1);
    b.put_u8(channel);
    b.put_slice(data);
    Message::Binary(b.freeze())
}

/// Runs the session over the socket until the process ends (then sends the Status and closes)
/// or the client goes away (then the session is dropped, which kills an exec).
pub async fn serve(ws: WebSocket, protocol: Protocol, session: Session) {
    let Session { command, stdin, mut stdout, mut stderr, resize, mut exit, _kill_on_drop, .. } = session;
    let mut stdin = stdin;
    let (mut tx, mut rx) = ws.split();
    let mut client_open = true;
    let mut exit_status: Option<ExitStatus> = None;
    let mut exit_done = false;
    loop {
        let outputs_done = stdout.is_none() && stderr.is_none();
        if outputs_done && let Some(status) = exit_status.take() {
            let body = status_json(&command, &status).to_string();
            let _ = tx.send(frame(ERROR, body.as_bytes())).await;
            // client-go treats anything but a normal closure (1000) as an error on every stream.
            let close = CloseFrame { code: axum::extract::ws::close_code::NORMAL, reason: "".into() };
            let _ = tx.send(Message::Close(Some(close))).await;
            break;
        }
        tokio::select! {
            chunk = recv(&mut stdout) => match chunk {
                Some(c) => if tx.send(frame(STDOUT, &c)).await.is_err() { break },
                None => stdout = None,
            },
            chunk = recv(&mut stderr) => match chunk {
                Some(c) => if tx.send(frame(STDERR, &c)).await.is_err() { break },
                None => stderr = None,
            },
            status = &mut exit, if !exit_done => {
                exit_done = true;
                exit_status = Some(status.unwrap_or_else(|_| ExitStatus::Failed("the session ended without an exit status".into())));
            },
            msg = rx.next(), if client_open => {
                let data: Bytes = match msg {
                    Some(Ok(Message::Binary(b))) => b,
                    Some(Ok(Message::Text(t))) => Bytes::copy_from_slice(t.as_str().as_bytes()),
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    // The client is gone: nothing can be delivered any more.
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                        client_open = false;
                        stdin = None;
                        break;
                    }
                };
                let Some((&channel, payload)) = data.split_first() else { continue };
                match channel {
                    STDIN => if let Some(s) = &stdin
                        && !payload.is_empty() && s.send(Bytes::copy_from_slice(payload)).await.is_err() {
                            stdin = None;
                        },
                    RESIZE => if let (Some(r), Ok(size)) = (&resize, serde_json::from_slice::<TerminalSize>(payload)) {
                        let _ = r.try_send(size);
                    },
                    // v5: the client closed its stdin; end the process's input.
                    CLOSE if protocol == Protocol::V5 && payload.first() == Some(&STDIN) => stdin = None,
                    _ => {}
                }
            },
        }
    }
    drop(stdin);
    let _ = client_open;
}

async fn recv(ch: &mut Option<tokio::sync::mpsc::Receiver<Bytes>>) -> Option<Bytes> {
    match ch {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_zero_exit_status_matches_the_api_server() {
        let cmd = vec!["sh".to_string(), "-c".to_string(), "exit 3".to_string()];
        let v = status_json(&cmd, &ExitStatus::Exited(3));
        assert_eq!(
            v,
            serde_json::json!({
                "metadata": {}, "status": "Failure",
                "message": "command terminated with non-zero exit code: error executing command [sh -c exit 3], exit code 3",
                "reason": "NonZeroExitCode",
                "details": {"causes": [{"reason": "ExitCode", "message": "3"}]}
            })
        );
        assert_eq!(status_json(&cmd, &ExitStatus::Exited(0)), serde_json::json!({"metadata": {}, "status": "Success"}));
    }

    #[test]
    fn protocol_negotiation_prefers_v5() {
        assert_eq!(Protocol::from_header("v4.channel.k8s.io, v5.channel.k8s.io"), Some(Protocol::V5));
        assert_eq!(Protocol::from_header("v4.channel.k8s.io"), Some(Protocol::V4));
        assert_eq!(Protocol::from_header("channel.k8s.io"), None);
    }
}
