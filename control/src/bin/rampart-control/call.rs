//! `rampart-control call`: the I/O around [`control::call`]: requests from the command line
//! or standard input, responses and errors as JSON on standard output and standard error.

use std::io::{BufRead as _, Read as _, Write as _};
use std::time::Duration;

use anyhow::{Context as _, Result};
use prost_reflect::{DynamicMessage, MethodDescriptor};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;

use control::call::{self, CallError, Requests};
use control::client::Link;

/// One-shot RPCs that have not answered after this long have failed.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn run(
    link: Link,
    method: MethodDescriptor,
    request: Option<String>,
    timeout: Option<u64>,
) -> Result<()> {
    let streaming = method.is_client_streaming() || method.is_server_streaming();
    let limit = match timeout {
        Some(0) => None,
        Some(seconds) => Some(Duration::from_secs(seconds)),
        None if streaming => None,
        None => Some(DEFAULT_TIMEOUT),
    };
    let (requests, mut bad_input) = requests(&method, request.as_deref())?;
    let channel = tokio::time::timeout(CONNECT_TIMEOUT, link.connect())
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "no TLS connection to {} within {CONNECT_TIMEOUT:?}",
                link.endpoint()
            )
        })?
        .with_context(|| format!("connecting to {}", link.endpoint()))?;

    let exchange = async {
        let mut responses = call::call(channel, &method, requests).await?;
        let mut stdout = std::io::stdout().lock();
        while let Some(response) = responses.next().await {
            let json = call::to_json(&response?);
            // Streams print one object per line, as they come; a single answer is pretty.
            let text = if method.is_server_streaming() {
                serde_json::to_string(&json)
            } else {
                serde_json::to_string_pretty(&json)
            }
            .context("printing the response")?;
            writeln!(stdout, "{text}").and_then(|()| stdout.flush())?;
        }
        Ok::<_, anyhow::Error>(())
    };
    let exchange = async {
        match limit {
            Some(limit) => tokio::time::timeout(limit, exchange)
                .await
                .unwrap_or_else(|_| {
                    Err(tonic::Status::deadline_exceeded(format!(
                        "no complete answer within {} s",
                        limit.as_secs()
                    ))
                    .into())
                }),
            None => exchange.await,
        }
    };
    let outcome = tokio::select! {
        outcome = exchange => outcome,
        Ok(error) = &mut bad_input => Err(error.into()),
    };
    match outcome {
        Ok(()) => Ok(()),
        Err(error) => match error.downcast::<tonic::Status>() {
            Ok(status) => {
                let json = serde_json::json!({
                    "error": { "code": format!("{:?}", status.code()), "message": status.message() }
                });
                eprintln!("{json}");
                std::process::exit(1);
            }
            Err(error) => Err(error),
        },
    }
}

/// The request stream, and where a bad request read later from standard input is reported.
fn requests(
    method: &MethodDescriptor,
    request: Option<&str>,
) -> Result<(Requests, oneshot::Receiver<CallError>)> {
    let input = method.input();
    let (error_tx, error_rx) = oneshot::channel();
    let stdin = request.is_none_or(|r| r == "-");
    if !method.is_client_streaming() {
        let json = match request {
            None => "{}".to_owned(),
            Some("-") => {
                let mut text = String::new();
                std::io::stdin()
                    .read_to_string(&mut text)
                    .context("reading the request from standard input")?;
                text
            }
            Some(json) => json.to_owned(),
        };
        let message = call::from_json(&input, &json)?;
        return Ok((Box::pin(tokio_stream::once(message)), error_rx));
    }
    if !stdin {
        let message = call::from_json(&input, request.unwrap_or("{}"))?;
        return Ok((Box::pin(tokio_stream::once(message)), error_rx));
    }
    // Lines are read as they are written, so a script can answer what the server streams.
    let (tx, rx) = mpsc::channel::<DynamicMessage>(16);
    std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            for line in std::io::stdin().lock().lines() {
                let Ok(line) = line else { break };
                if line.trim().is_empty() {
                    continue;
                }
                match call::from_json(&input, &line) {
                    Ok(message) => {
                        if tx.blocking_send(message).is_err() {
                            break;
                        }
                    }
                    Err(error) => {
                        let _ = error_tx.send(error);
                        break;
                    }
                }
            }
        })
        .context("starting the standard input reader")?;
    Ok((Box::pin(ReceiverStream::new(rx)), error_rx))
}
