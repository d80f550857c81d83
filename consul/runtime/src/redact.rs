//! Credentials never leave in what simq prints: `http://user:secret@host/` in an address,
//! an error or a log line reads `http://***@host/`.

/// `text` with the user-info part (`user:password@`) of every URL in it replaced by `***@`.
pub fn redact(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let (head, tail) = rest.split_at(at + 3);
        out.push_str(head);
        // The authority ends at the first '/', '?', '#' or whitespace; user-info is
        // everything in it up to its last '@'.
        let end = tail
            .find(|c: char| matches!(c, '/' | '?' | '#' | '"' | '\'') || c.is_whitespace())
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        match authority.rfind('@') {
            Some(i) => {
                out.push_str("***@");
                out.push_str(&authority[i + 1..]);
            }
            None => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn user_info_is_removed_from_every_url_and_nothing_else_changes() {
        assert_eq!(
            redact("Consul at http://admin:s3cret@10.0.0.1:8500 is unreachable: error sending request for url (http://admin:s3cret@10.0.0.1:8500/v1/kv/simq/active)"),
            "Consul at http://***@10.0.0.1:8500 is unreachable: error sending request for url (http://***@10.0.0.1:8500/v1/kv/simq/active)"
        );
        assert_eq!(redact("https://tok@h/x?a=b@c"), "https://***@h/x?a=b@c");
        assert_eq!(
            redact("http://127.0.0.1:8500 and mail a@b"),
            "http://127.0.0.1:8500 and mail a@b"
        );
        assert_eq!(redact("no url"), "no url");
        assert_eq!(redact("http://"), "http://");
    }
}
