//! Meridian's wire types: the generated `meridian.v1` messages, clients and servers, and the
//! framing rules of the routing streams ([`updates`]: how a table is cut into parts and deltas
//! and put back together), which both ends of a stream must share.
//!
//! These are wire types only. Each crate converts them into its own domain types with `TryFrom`
//! at its edge, so validation happens once, where input enters.

pub mod updates;

/// `meridian.v1`: functions, the mesh view, the agent push stream and the agent's local API.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("meridian.v1");
}

/// Encoded `FileDescriptorSet` of every Meridian proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("meridian_descriptor");
