//! Any RPC of the contract by name, with JSON in and out (the proto3 JSON mapping), for
//! `rampart-control call`. One generic path serves every RPC, unary and streaming, from the
//! descriptors this build compiled, so the tool can never lag behind the `.proto` files.

use std::pin::Pin;

use prost::Message as _;
use prost_reflect::{
    DescriptorPool, DynamicMessage, MessageDescriptor, MethodDescriptor, SerializeOptions,
};
use tokio_stream::Stream;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;
use tonic::{Status, Streaming};

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("the embedded descriptors do not decode: {0}")]
    Descriptors(#[from] prost_reflect::DescriptorError),
    #[error("no RPC is called {0:?}; `rampart-control rpcs` lists them")]
    UnknownRpc(String),
    #[error("{0:?} names more than one RPC ({1}); say which, as Service/Method")]
    AmbiguousRpc(String, String),
    #[error("not a {message} in JSON: {problem}")]
    BadRequest { message: String, problem: String },
}

/// Every RPC of the contract, in the order of the `.proto` files.
pub fn methods() -> Result<Vec<MethodDescriptor>, CallError> {
    let pool = DescriptorPool::decode(proto::FILE_DESCRIPTOR_SET)?;
    Ok(pool
        .services()
        .flat_map(|s| s.methods().collect::<Vec<_>>())
        .collect())
}

/// `Service/Method` as the tool shows it (the service without its package).
pub fn display_name(method: &MethodDescriptor) -> String {
    format!("{}/{}", method.parent_service().name(), method.name())
}

/// The RPC `name` designates: `Service/Method`, `package.Service/Method`, or the method
/// alone when no other service has one of that name; case, `-` and `_` do not matter, so
/// `issue-media-credentials` is `FrontEnd/IssueMediaCredentials`.
pub fn find(name: &str) -> Result<MethodDescriptor, CallError> {
    let fold = |s: &str| {
        s.chars()
            .filter(|c| !matches!(c, '-' | '_'))
            .flat_map(char::to_lowercase)
            .collect::<String>()
    };
    let wanted = fold(name.trim().trim_start_matches('/'));
    let matches: Vec<_> = methods()?
        .into_iter()
        .filter(|m| {
            let service = m.parent_service();
            let method = fold(m.name());
            wanted == method
                || wanted == format!("{}/{method}", fold(service.name()))
                || wanted == format!("{}/{method}", fold(service.full_name()))
        })
        .collect();
    match matches.as_slice() {
        [] => Err(CallError::UnknownRpc(name.to_owned())),
        [one] => Ok(one.clone()),
        many => Err(CallError::AmbiguousRpc(
            name.to_owned(),
            many.iter().map(display_name).collect::<Vec<_>>().join(", "),
        )),
    }
}

/// A request (or any message) of type `descriptor` from JSON; unknown fields are refused, so
/// a misspelt field is an error rather than silently left at its default.
pub fn from_json(descriptor: &MessageDescriptor, json: &str) -> Result<DynamicMessage, CallError> {
    let bad = |problem: String| CallError::BadRequest {
        message: descriptor.full_name().to_owned(),
        problem,
    };
    let mut deserializer = serde_json::Deserializer::from_str(json);
    let message = DynamicMessage::deserialize(descriptor.clone(), &mut deserializer)
        .map_err(|e| bad(e.to_string()))?;
    deserializer.end().map_err(|e| bad(e.to_string()))?;
    Ok(message)
}

/// A message as JSON with every field, defaults included, so scripts need not know proto3's
/// rule that defaults are omitted.
pub fn to_json(message: &DynamicMessage) -> serde_json::Value {
    let options = SerializeOptions::new().skip_default_fields(false);
    message
        .serialize_with_options(serde_json::value::Serializer, &options)
        // Serializing into a Value cannot fail: every key is a string.
        .unwrap_or(serde_json::Value::Null)
}

/// A stream of requests for [`call`].
pub type Requests = Pin<Box<dyn Stream<Item = DynamicMessage> + Send + 'static>>;

/// Calls `method` with `requests` and returns its responses as they arrive. Every RPC kind
/// goes the same way: on the wire a unary call is a stream of one message each way.
pub async fn call(
    channel: Channel,
    method: &MethodDescriptor,
    requests: Requests,
) -> Result<Streaming<DynamicMessage>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(format!("the control service is not ready: {e}")))?;
    let path = format!("/{}/{}", method.parent_service().full_name(), method.name())
        .parse()
        .map_err(|e| Status::internal(format!("RPC path: {e}")))?;
    let codec = DynamicCodec {
        response: method.output(),
    };
    Ok(grpc
        .streaming(tonic::Request::new(requests), path, codec)
        .await?
        .into_inner())
}

/// Encodes requests as they are, decodes responses by the method's output descriptor.
struct DynamicCodec {
    response: MessageDescriptor,
}

impl Codec for DynamicCodec {
    type Encode = DynamicMessage;
    type Decode = DynamicMessage;
    type Encoder = DynamicEncoder;
    type Decoder = DynamicDecoder;

    fn encoder(&mut self) -> DynamicEncoder {
        DynamicEncoder
    }

    fn decoder(&mut self) -> DynamicDecoder {
        DynamicDecoder(self.response.clone())
    }
}

struct DynamicEncoder;

impl Encoder for DynamicEncoder {
    type Item = DynamicMessage;
    type Error = Status;

    fn encode(&mut self, item: DynamicMessage, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(dst)
            .map_err(|e| Status::internal(format!("encoding the request: {e}")))
    }
}

struct DynamicDecoder(MessageDescriptor);

impl Decoder for DynamicDecoder {
    type Item = DynamicMessage;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<DynamicMessage>, Status> {
        DynamicMessage::decode(self.0.clone(), src)
            .map(Some)
            .map_err(|e| Status::internal(format!("undecodable response: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_find_their_rpc() {
        for name in [
            "FrontEnd/IssueMediaCredentials",
            "rampart.control.v1.FrontEnd/IssueMediaCredentials",
            "/rampart.control.v1.FrontEnd/IssueMediaCredentials",
            "IssueMediaCredentials",
            "issue-media-credentials",
            "front-end/issue_media_credentials",
        ] {
            let method = find(name).unwrap();
            assert_eq!(display_name(&method), "FrontEnd/IssueMediaCredentials");
        }
        assert!(matches!(find("NoSuchRpc"), Err(CallError::UnknownRpc(_))));
        assert!(matches!(
            find("Operator/IssueMediaCredentials"),
            Err(CallError::UnknownRpc(_))
        ));
    }

    #[test]
    fn every_rpc_of_every_service_is_callable() {
        let names: Vec<_> = methods().unwrap().iter().map(display_name).collect();
        for expected in [
            "RelayAgent/RegisterAgent",
            "RelayAgent/Sync",
            "FrontEnd/RevokeUser",
            "Operator/ListConferences",
        ] {
            assert!(names.iter().any(|n| n == expected), "{expected}: {names:?}");
        }
        for method in methods().unwrap() {
            assert_eq!(
                find(&display_name(&method)).unwrap().full_name(),
                method.full_name()
            );
        }
    }

    #[test]
    fn json_round_trips_through_the_generated_types() {
        let method = find("IssueMediaCredentials").unwrap();
        let request = from_json(&method.input(), r#"{"user": "alice@example.com"}"#).unwrap();
        let typed = proto::control::v1::IssueMediaCredentialsRequest::decode(
            request.encode_to_vec().as_slice(),
        )
        .unwrap();
        assert_eq!(typed.user, "alice@example.com");
        assert_eq!(to_json(&request)["user"], "alice@example.com");
    }

    #[test]
    fn bad_requests_say_what_is_wrong() {
        let input = find("IssueMediaCredentials").unwrap().input();
        for (json, says) in [
            (r#"{"usr": "alice"}"#, "usr"),
            (r#"{"user": 5}"#, "string"),
            (r#"{"user": "a"} trailing"#, "trailing"),
            ("", "EOF"),
        ] {
            let error = from_json(&input, json).unwrap_err().to_string();
            assert!(error.contains(says), "{json}: {error}");
            assert!(error.contains("IssueMediaCredentialsRequest"), "{error}");
        }
    }
}
