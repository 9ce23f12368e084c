//! ttrpc, the RPC protocol NRI speaks on each logical connection: a
//! message is a 10-byte header (data length u32, stream ID u32, both big
//! endian; message type u8; flags u8) and then the data. A call is one
//! Request (type 1) on a new stream, answered by one Response (type 2) on
//! the same stream. A client's stream IDs are odd and increase. Request
//! and Response are protobuf messages; an error travels as a
//! `google.rpc.Status` in the Response.

/// A message's header length.
pub const HEADER_LEN: usize = 10;
/// The most data one message may carry.
pub const MAX_DATA: usize = 4 << 20;
/// A request.
pub const TYPE_REQUEST: u8 = 1;
/// A response.
pub const TYPE_RESPONSE: u8 = 2;

/// A gRPC status code (`google.rpc.Code`).
pub mod code {
    /// Not an error.
    pub const OK: i32 = 0;
    /// The request was malformed or asked for something impossible.
    pub const INVALID_ARGUMENT: i32 = 3;
    /// A precondition the request depends on does not hold.
    pub const FAILED_PRECONDITION: i32 = 9;
    /// No such service or method.
    pub const UNIMPLEMENTED: i32 = 12;
    /// The server failed.
    pub const INTERNAL: i32 = 13;
}

/// A call: which service and method, and the method's request, encoded.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Request {
    /// Fully qualified service name (`nri.pkg.api.v1alpha1.Plugin`).
    #[prost(string, tag = "1")]
    pub service: String,
    /// Method name (`CreateContainer`).
    #[prost(string, tag = "2")]
    pub method: String,
    /// The method's request message.
    #[prost(bytes = "vec", tag = "3")]
    pub payload: Vec<u8>,
    /// How long the caller waits, in nanoseconds (0: no limit).
    #[prost(int64, tag = "4")]
    pub timeout_nano: i64,
    /// Key-value metadata (trace context); vfplane ignores it.
    #[prost(message, repeated, tag = "5")]
    pub metadata: Vec<KeyValue>,
}

/// One metadata pair.
#[derive(Clone, PartialEq, prost::Message)]
pub struct KeyValue {
    /// The key.
    #[prost(string, tag = "1")]
    pub key: String,
    /// The value.
    #[prost(string, tag = "2")]
    pub value: String,
}

/// The answer to a call: an error status, or the method's response.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Response {
    /// Set (with a non-zero code) when the call failed.
    #[prost(message, optional, tag = "1")]
    pub status: Option<Status>,
    /// The method's response message.
    #[prost(bytes = "vec", tag = "2")]
    pub payload: Vec<u8>,
}

/// `google.rpc.Status` without its details, which vfplane neither sends
/// nor reads.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Status {
    /// A [`code`].
    #[prost(int32, tag = "1")]
    pub code: i32,
    /// What went wrong, for people.
    #[prost(string, tag = "2")]
    pub message: String,
}

/// One ttrpc message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Its stream.
    pub stream: u32,
    /// [`TYPE_REQUEST`] or [`TYPE_RESPONSE`] (or another type, which is refused).
    pub kind: u8,
    /// Its flags (0 for the unary calls NRI makes).
    pub flags: u8,
    /// The encoded Request or Response.
    pub data: Vec<u8>,
}

/// Why bytes on a connection are not ttrpc.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// A header announcing more data than a message may have.
    #[error("a ttrpc message on stream {stream} announces {len} bytes, more than the {MAX_DATA} allowed")]
    Oversized {
        /// The stream.
        stream: u32,
        /// The announced length.
        len: usize,
    },
}

impl Message {
    /// The message as bytes on the wire.
    ///
    /// # Errors
    /// Data longer than [`MAX_DATA`].
    pub fn encode(&self) -> Result<Vec<u8>, FrameError> {
        if self.data.len() > MAX_DATA {
            return Err(FrameError::Oversized {
                stream: self.stream,
                len: self.data.len(),
            });
        }
        let mut out = Vec::with_capacity(HEADER_LEN + self.data.len());
        out.extend_from_slice(&u32::try_from(self.data.len()).unwrap_or(u32::MAX).to_be_bytes());
        out.extend_from_slice(&self.stream.to_be_bytes());
        out.push(self.kind);
        out.push(self.flags);
        out.extend_from_slice(&self.data);
        Ok(out)
    }
}

/// Reassembles the messages of one logical connection from its frames.
#[derive(Debug, Default)]
pub struct Reassembler {
    buffer: Vec<u8>,
}

impl Reassembler {
    /// Adds bytes that arrived and returns every message now complete.
    ///
    /// # Errors
    /// A header announcing more than [`MAX_DATA`]: the connection cannot
    /// be read further.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<Message>, FrameError> {
        self.buffer.extend_from_slice(bytes);
        let mut messages = Vec::new();
        loop {
            if self.buffer.len() < HEADER_LEN {
                break;
            }
            let len =
                u32::from_be_bytes([self.buffer[0], self.buffer[1], self.buffer[2], self.buffer[3]]) as usize;
            let stream = u32::from_be_bytes([self.buffer[4], self.buffer[5], self.buffer[6], self.buffer[7]]);
            if len > MAX_DATA {
                return Err(FrameError::Oversized { stream, len });
            }
            if self.buffer.len() < HEADER_LEN + len {
                break;
            }
            let kind = self.buffer[8];
            let flags = self.buffer[9];
            let data = self.buffer[HEADER_LEN..HEADER_LEN + len].to_vec();
            self.buffer.drain(..HEADER_LEN + len);
            messages.push(Message {
                stream,
                kind,
                flags,
                data,
            });
        }
        Ok(messages)
    }
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;

    #[test]
    fn a_message_encodes_with_its_header_and_reassembles_across_any_split() {
        let request = Request {
            service: "nri.pkg.api.v1alpha1.Runtime".into(),
            method: "RegisterPlugin".into(),
            payload: vec![1, 2, 3],
            timeout_nano: 0,
            metadata: Vec::new(),
        };
        let message = Message {
            stream: 3,
            kind: TYPE_REQUEST,
            flags: 0,
            data: request.encode_to_vec(),
        };
        let bytes = message.encode().unwrap();
        assert_eq!(
            &bytes[..4],
            &u32::try_from(message.data.len()).unwrap().to_be_bytes()
        );
        assert_eq!(&bytes[4..10], &[0, 0, 0, 3, TYPE_REQUEST, 0]);
        for split in 0..bytes.len() {
            let mut reassembler = Reassembler::default();
            let mut got = reassembler.push(&bytes[..split]).unwrap();
            got.extend(reassembler.push(&bytes[split..]).unwrap());
            assert_eq!(got, std::slice::from_ref(&message), "split at {split}");
        }
        let decoded = Request::decode(message.data.as_slice()).unwrap();
        assert_eq!(decoded, request);
    }

    #[test]
    fn two_messages_in_one_push_both_come_out() {
        let a = Message {
            stream: 1,
            kind: TYPE_RESPONSE,
            flags: 0,
            data: b"a".to_vec(),
        };
        let b = Message {
            stream: 3,
            kind: TYPE_RESPONSE,
            flags: 0,
            data: Vec::new(),
        };
        let mut bytes = a.encode().unwrap();
        bytes.extend(b.encode().unwrap());
        assert_eq!(Reassembler::default().push(&bytes).unwrap(), [a, b]);
    }

    #[test]
    fn an_oversized_header_is_refused() {
        let mut header = u32::MAX.to_be_bytes().to_vec();
        header.extend_from_slice(&[0, 0, 0, 1, 1, 0]);
        let error = Reassembler::default().push(&header).unwrap_err();
        assert!(error.to_string().contains("stream 1"), "{error}");
    }

    #[test]
    fn an_error_status_round_trips() {
        let response = Response {
            status: Some(Status {
                code: code::INVALID_ARGUMENT,
                message: "no".into(),
            }),
            payload: Vec::new(),
        };
        assert_eq!(
            Response::decode(response.encode_to_vec().as_slice()).unwrap(),
            response
        );
    }
}
