//! The registration socket's relay: it rewrites the HTTP/2 `:authority`
//! the kubelet's plugin watcher sends.
//!
//! Kubelet 1.37's plugin manager dials a registration socket by its bare
//! path, so grpc-go sends that path (`/var/lib/kubelet/plugins_registry/
//! vfplane.io-reg.sock`) as `:authority` (its other unix clients send
//! `localhost`, kubernetes#112597). h2, under tonic, refuses such a request
//! with `PROTOCOL_ERROR`, since an authority cannot hold a `/`; the kubelet
//! then never registers the driver (seen on the real node). The relay sits
//! between the socket and the in-process tonic server: it decodes each of
//! the client's header blocks (HPACK, with the connection's own dynamic
//! table), sets `:authority` to `localhost`, encodes the block again for
//! the server, and passes every other frame, and the server's whole
//! direction, through untouched.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

/// The client connection preface (RFC 9113, 3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The frame size every HTTP/2 peer accepts (SETTINGS_MAX_FRAME_SIZE's
/// initial value); larger frames from the client are refused.
const MAX_FRAME: usize = 16_384;

fn malformed(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("HTTP/2 from the kubelet: {what}"),
    )
}

/// One frame: header fields and payload.
struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

async fn read_frame(from: &mut (impl AsyncRead + Unpin)) -> io::Result<Option<Frame>> {
    let mut head = [0u8; 9];
    match from.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
    if len > MAX_FRAME {
        return Err(malformed(&format!("a frame of {len} bytes")));
    }
    let mut payload = vec![0u8; len];
    from.read_exact(&mut payload).await?;
    Ok(Some(Frame {
        kind: head[3],
        flags: head[4],
        stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
        payload,
    }))
}

fn frame_bytes(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut out = Vec::with_capacity(9 + len);
    // `len` is at most MAX_FRAME, so it fits in 24 bits.
    out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// The header block with `:authority` set to `localhost`, as the frames
/// that carry it: a HEADERS frame (keeping END_STREAM and the priority
/// fields) and CONTINUATION frames if the block needs them.
fn rewrite_block(
    decoder: &mut fluke_hpack::Decoder<'_>,
    encoder: &mut fluke_hpack::Encoder<'_>,
    flags: u8,
    stream: u32,
    priority: Option<[u8; 5]>,
    block: &[u8],
) -> io::Result<Vec<u8>> {
    let mut headers = decoder
        .decode(block)
        .map_err(|e| malformed(&format!("a header block HPACK cannot decode ({e:?})")))?;
    for (name, value) in &mut headers {
        if name.as_slice() == b":authority" {
            *value = b"localhost".to_vec();
        }
    }
    let encoded = encoder.encode(headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
    let mut first = Vec::new();
    if let Some(fields) = priority {
        first.extend_from_slice(&fields);
    }
    let room = MAX_FRAME - first.len();
    let (head, mut rest) = encoded.split_at(encoded.len().min(room));
    first.extend_from_slice(head);
    let mut head_flags = flags & (END_STREAM | PRIORITY);
    if rest.is_empty() {
        head_flags |= END_HEADERS;
    }
    let mut out = frame_bytes(HEADERS, head_flags, stream, &first);
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(rest.len().min(MAX_FRAME));
        rest = tail;
        let end = if rest.is_empty() { END_HEADERS } else { 0 };
        out.extend_from_slice(&frame_bytes(CONTINUATION, end, stream, chunk));
    }
    Ok(out)
}

/// Copies the client's side of an HTTP/2 connection to the server,
/// rewriting `:authority` in every header block. Ends when the client
/// closes.
///
/// # Errors
/// Reading or writing fails, or the client sends what is not HTTP/2.
pub async fn client_to_server(
    mut client: impl AsyncRead + Unpin,
    mut server: impl AsyncWrite + Unpin,
) -> io::Result<()> {
    let mut preface = [0u8; 24];
    client.read_exact(&mut preface).await?;
    if &preface != PREFACE {
        return Err(malformed("no connection preface"));
    }
    server.write_all(PREFACE).await?;
    let mut decoder = fluke_hpack::Decoder::new();
    let mut encoder = fluke_hpack::Encoder::new();
    while let Some(frame) = read_frame(&mut client).await? {
        if frame.kind != HEADERS {
            server
                .write_all(&frame_bytes(
                    frame.kind,
                    frame.flags,
                    frame.stream,
                    &frame.payload,
                ))
                .await?;
            continue;
        }
        let mut data = frame.payload.as_slice();
        if frame.flags & PADDED != 0 {
            let (&pad, rest) = data
                .split_first()
                .ok_or_else(|| malformed("empty padded HEADERS"))?;
            let keep = rest
                .len()
                .checked_sub(usize::from(pad))
                .ok_or_else(|| malformed("padding longer than its frame"))?;
            data = &rest[..keep];
        }
        let mut priority = None;
        if frame.flags & PRIORITY != 0 {
            let (fields, rest) = data
                .split_first_chunk::<5>()
                .ok_or_else(|| malformed("HEADERS too short for its priority"))?;
            priority = Some(*fields);
            data = rest;
        }
        let mut block = data.to_vec();
        let mut ended = frame.flags & END_HEADERS != 0;
        while !ended {
            let next = read_frame(&mut client)
                .await?
                .ok_or_else(|| malformed("the connection ended inside a header block"))?;
            if next.kind != CONTINUATION || next.stream != frame.stream {
                return Err(malformed("a header block interrupted by another frame"));
            }
            block.extend_from_slice(&next.payload);
            ended = next.flags & END_HEADERS != 0;
        }
        let out = rewrite_block(
            &mut decoder,
            &mut encoder,
            frame.flags,
            frame.stream,
            priority,
            &block,
        )?;
        server.write_all(&out).await?;
    }
    server.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client's HEADERS frame for `authority`, its block split over a
    /// CONTINUATION frame, padded, with priority fields.
    fn client_headers(encoder: &mut fluke_hpack::Encoder<'_>, authority: &[u8]) -> Vec<u8> {
        let block = encoder.encode([
            (&b":method"[..], &b"POST"[..]),
            (b":scheme", b"http"),
            (b":path", b"/pluginregistration.Registration/GetInfo"),
            (b":authority", authority),
            (b"content-type", b"application/grpc"),
        ]);
        let (a, b) = block.split_at(block.len() / 2);
        let mut first = vec![2u8]; // pad length
        first.extend_from_slice(&[0, 0, 0, 0, 15]); // priority fields
        first.extend_from_slice(a);
        first.extend_from_slice(&[0, 0]); // padding
        let mut out = frame_bytes(HEADERS, PADDED | PRIORITY | END_STREAM, 1, &first);
        out.extend_from_slice(&frame_bytes(CONTINUATION, END_HEADERS, 1, b));
        out
    }

    #[tokio::test]
    async fn the_socket_path_as_authority_reaches_the_server_as_localhost_and_the_rest_unchanged() {
        let mut client_encoder = fluke_hpack::Encoder::new();
        let mut input = PREFACE.to_vec();
        let settings = frame_bytes(0x4, 0, 0, &[]);
        input.extend_from_slice(&settings);
        input.extend_from_slice(&client_headers(
            &mut client_encoder,
            b"/var/lib/kubelet/plugins_registry/vfplane.io-reg.sock",
        ));
        // The second request's block uses the dynamic table the first one
        // filled: the relay's decoder must have kept it.
        input.extend_from_slice(&client_headers(
            &mut client_encoder,
            b"/var/lib/kubelet/plugins_registry/vfplane.io-reg.sock",
        ));
        let data = frame_bytes(0x0, END_STREAM, 3, &[0, 0, 0, 0, 0]);
        input.extend_from_slice(&data);

        let mut output = Vec::new();
        client_to_server(input.as_slice(), &mut output).await.unwrap();

        assert_eq!(&output[..24], PREFACE);
        let mut rest = &output[24..];
        let mut frames = Vec::new();
        while let Some(frame) = read_frame(&mut rest).await.unwrap() {
            frames.push(frame);
        }
        let kinds: Vec<u8> = frames.iter().map(|f| f.kind).collect();
        assert_eq!(
            kinds,
            [0x4, HEADERS, HEADERS, 0x0],
            "settings, two header blocks, data"
        );
        assert_eq!(frames[3].payload, [0, 0, 0, 0, 0]);
        let mut server_decoder = fluke_hpack::Decoder::new();
        for headers in &frames[1..3] {
            assert_eq!(headers.flags, END_STREAM | PRIORITY | END_HEADERS);
            assert_eq!(&headers.payload[..5], &[0, 0, 0, 0, 15]);
            let decoded = server_decoder.decode(&headers.payload[5..]).unwrap();
            let authority = decoded
                .iter()
                .find(|(n, _)| n == b":authority")
                .map(|(_, v)| v.as_slice());
            assert_eq!(authority, Some(&b"localhost"[..]));
            let path = decoded
                .iter()
                .find(|(n, _)| n == b":path")
                .map(|(_, v)| v.as_slice());
            assert_eq!(path, Some(&b"/pluginregistration.Registration/GetInfo"[..]));
        }
    }

    #[tokio::test]
    async fn what_is_not_http2_is_refused() {
        let error = client_to_server(&b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..], Vec::new())
            .await
            .unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        let mut oversized = PREFACE.to_vec();
        oversized.extend_from_slice(&[0x01, 0x00, 0x00, 0x0, 0, 0, 0, 0, 0]);
        let error = client_to_server(oversized.as_slice(), Vec::new())
            .await
            .unwrap_err();
        assert!(error.to_string().contains("a frame of 65536 bytes"), "{error}");
    }
}
