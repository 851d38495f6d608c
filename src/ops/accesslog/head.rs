//! The parts of a request head a line shows, copied out of the buffers they arrived in.

use http::HeaderValue;

/// Request id, raw path, `Host` and `User-Agent` of one request, in one allocation.
///
/// Copied rather than shared: a `HeaderValue` or `Uri` hyper hands us is a slice of the
/// connection's read buffer, and an entry holding one keeps that whole buffer (8 KB and up)
/// alive until the writer thread gets to it. Behind a stalled log pipe the 16k queued entries
/// held about 70 MB of read buffers that way.
#[derive(Debug, Clone, Default)]
pub struct HeadText {
    text: Box<str>,
    /// Where the request id, the path and the host end in `text`; the user agent runs on to
    /// the end.
    ends: [usize; 3],
    /// Whether a `Host` and a `User-Agent` were sent as visible ASCII (else logged as absent).
    has_host: bool,
    has_user_agent: bool,
}

impl HeadText {
    /// Copies what the line shows; the query is not kept (queries can carry secrets).
    pub fn new(
        request_id: &HeaderValue,
        path: &str,
        host: Option<&str>,
        user_agent: Option<&HeaderValue>,
    ) -> HeadText {
        let request_id = request_id.to_str().unwrap_or("-");
        let user_agent = user_agent.and_then(|v| v.to_str().ok());
        let parts = [
            request_id,
            path,
            host.unwrap_or(""),
            user_agent.unwrap_or(""),
        ];
        let mut text = String::with_capacity(parts.iter().map(|p| p.len()).sum());
        let mut ends = [0; 3];
        for (i, part) in parts.iter().enumerate() {
            text.push_str(part);
            if let Some(end) = ends.get_mut(i) {
                *end = text.len();
            }
        }
        HeadText {
            text: text.into_boxed_str(),
            ends,
            has_host: host.is_some(),
            has_user_agent: user_agent.is_some(),
        }
    }

    fn part(&self, from: usize, to: usize) -> &str {
        self.text.get(from..to).unwrap_or_default()
    }

    /// The request id, or `-` when it was not visible ASCII.
    pub fn request_id(&self) -> &str {
        self.part(0, self.ends[0])
    }

    /// The path as received, without its query.
    pub fn path(&self) -> &str {
        self.part(self.ends[0], self.ends[1])
    }

    /// `Host` (or the absolute-form authority) the client sent.
    pub fn host(&self) -> Option<&str> {
        self.has_host.then(|| self.part(self.ends[1], self.ends[2]))
    }

    /// `User-Agent` the client sent.
    pub fn user_agent(&self) -> Option<&str> {
        self.has_user_agent
            .then(|| self.part(self.ends[2], self.text.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_come_back_as_given() {
        let h = HeadText::new(
            &HeaderValue::from_static("rid"),
            "/a/b",
            Some("api.example.com"),
            Some(&HeaderValue::from_static("curl/8")),
        );
        assert_eq!(h.request_id(), "rid");
        assert_eq!(h.path(), "/a/b");
        assert_eq!(h.host(), Some("api.example.com"));
        assert_eq!(h.user_agent(), Some("curl/8"));
    }

    #[test]
    fn absent_and_unprintable_values_are_absent() {
        let odd = HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap();
        let h = HeadText::new(&odd, "/", None, Some(&odd));
        assert_eq!(h.request_id(), "-");
        assert_eq!(h.path(), "/");
        assert_eq!(h.host(), None);
        assert_eq!(h.user_agent(), None);
        let empty = HeadText::new(&HeaderValue::from_static("r"), "/x", Some(""), None);
        assert_eq!(empty.host(), Some(""));
        assert_eq!(empty.user_agent(), None);
    }

    #[test]
    fn a_copy_does_not_keep_the_source_buffer() {
        let buf = bytes::Bytes::from(b"GET /p HTTP/1.1\r\nHost: h\r\n".to_vec());
        let host = HeaderValue::from_maybe_shared(buf.slice(23..24)).unwrap();
        let h = HeadText::new(
            &HeaderValue::from_static("r"),
            "/p",
            host.to_str().ok(),
            None,
        );
        drop(host);
        // The only owner left is `buf`: the copy holds no reference into it.
        assert!(buf.is_unique());
        assert_eq!(h.host(), Some("h"));
    }
}
