//! Rampart's wire contract: the `.proto` files under `proto/` and the code prost and tonic
//! generate from them, the one contract between the agent (`relay-user`), the control
//! service (`control`), front-end nodes and operators' tools.
//!
//! The package is versioned (`rampart.control.v1`): a change that would break a deployed
//! peer goes into a new package (`v2`) served side by side, never into `v1`.

/// `rampart.control.v1`: the front-end, relay-agent and operator APIs of the control service.
pub mod control {
    pub mod v1 {
        // Generated code: its shape is prost's and tonic's, not ours.
        #![allow(clippy::all, clippy::pedantic, missing_docs, unused_qualifications)]
        tonic::include_proto!("rampart.control.v1");
    }
}

/// The encoded `FileDescriptorSet` of every `.proto` file of this crate (for gRPC reflection,
/// and for generating clients in other languages from the exact contract built here).
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/rampart_descriptor.bin"));

/// The `.proto` sources, by path under `proto/`, for tools that generate independent clients.
pub const PROTO_FILES: &[(&str, &str)] = &[
    (
        "rampart/control/v1/common.proto",
        include_str!("../proto/rampart/control/v1/common.proto"),
    ),
    (
        "rampart/control/v1/frontend.proto",
        include_str!("../proto/rampart/control/v1/frontend.proto"),
    ),
    (
        "rampart/control/v1/agent.proto",
        include_str!("../proto/rampart/control/v1/agent.proto"),
    ),
    (
        "rampart/control/v1/operator.proto",
        include_str!("../proto/rampart/control/v1/operator.proto"),
    ),
];

#[cfg(test)]
mod tests {
    use prost::Message as _;
    use prost_types::FileDescriptorSet;

    fn descriptors() -> FileDescriptorSet {
        FileDescriptorSet::decode(super::FILE_DESCRIPTOR_SET).unwrap()
    }

    #[test]
    fn every_file_is_in_the_versioned_package() {
        let set = descriptors();
        assert_eq!(set.file.len(), super::PROTO_FILES.len());
        for file in &set.file {
            assert_eq!(file.package(), "rampart.control.v1", "{}", file.name());
        }
    }

    /// Every message, field, oneof, enum, enum value, service and method carries a comment:
    /// the `.proto` files are the contract other implementations are written from.
    #[test]
    fn every_element_is_documented() {
        let mut missing = Vec::new();
        for file in descriptors().file {
            let documented: Vec<Vec<i32>> = file
                .source_code_info
                .as_ref()
                .expect("protox keeps source info")
                .location
                .iter()
                .filter(|l| !l.leading_comments().trim().is_empty())
                .map(|l| l.path.clone())
                .collect();
            let mut check = |path: Vec<i32>, what: String| {
                if !documented.contains(&path) {
                    missing.push(format!("{}: {what}", file.name()));
                }
            };
            // Field numbers of FileDescriptorProto, DescriptorProto, etc. (descriptor.proto).
            for (m, message) in file.message_type.iter().enumerate() {
                let at = vec![4, m as i32];
                check(at.clone(), format!("message {}", message.name()));
                for (f, field) in message.field.iter().enumerate() {
                    let mut path = at.clone();
                    path.extend([2, f as i32]);
                    check(path, format!("field {}.{}", message.name(), field.name()));
                }
                for (o, oneof) in message.oneof_decl.iter().enumerate() {
                    // proto3 `optional` fields are synthetic oneofs named `_field`.
                    if oneof.name().starts_with('_') {
                        continue;
                    }
                    let mut path = at.clone();
                    path.extend([8, o as i32]);
                    check(path, format!("oneof {}.{}", message.name(), oneof.name()));
                }
            }
            for (e, enumeration) in file.enum_type.iter().enumerate() {
                check(vec![5, e as i32], format!("enum {}", enumeration.name()));
                for (v, value) in enumeration.value.iter().enumerate() {
                    check(
                        vec![5, e as i32, 2, v as i32],
                        format!("value {}", value.name()),
                    );
                }
            }
            for (s, service) in file.service.iter().enumerate() {
                check(vec![6, s as i32], format!("service {}", service.name()));
                for (m, method) in service.method.iter().enumerate() {
                    check(
                        vec![6, s as i32, 2, m as i32],
                        format!("rpc {}", method.name()),
                    );
                }
            }
        }
        assert!(missing.is_empty(), "undocumented: {missing:#?}");
    }
}
