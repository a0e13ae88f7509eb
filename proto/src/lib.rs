//! Meridian's wire types: the generated `meridian.v1` messages, clients and servers.
//!
//! These are wire types only. Each crate converts them into its own domain types with `TryFrom`
//! at its edge, so validation happens once, where input enters.

#![allow(clippy::all, missing_docs)]

/// `meridian.v1`: functions, the mesh view, the agent push stream and the agent's local API.
pub mod v1 {
    tonic::include_proto!("meridian.v1");
}

/// Encoded `FileDescriptorSet` of every Meridian proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("meridian_descriptor");
