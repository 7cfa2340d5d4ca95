//! Access is decided on the route a request is routed to, not on its path
//! string: percent-encoded, double-slash, dot-segment and other odd spellings
//! of every protected route, sent byte for byte over a raw socket (an HTTP
//! client would normalise some of them), never reach a handler without the
//! key that route needs.

mod gateway_util;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use gateway::auth::{Access, ROUTES};
use gateway_util::*;

/// One request exactly as written; the status and the body of the answer.
fn raw(base: &str, method: &str, path: &str, key: Option<&str>) -> (u16, String) {
    let addr = base.trim_start_matches("http://");
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let body = if method == "POST" {
        r#"{"model":"demo/base","prompt":"hi","input":"hi","max_tokens":1,"messages":[{"role":"user","content":"hi"}]}"#
    } else {
        ""
    };
    let auth = key.map_or(String::new(), |k| format!("Authorization: Bearer {k}\r\n"));
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n{auth}Connection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

/// A concrete path of a route pattern (`{id}` filled in).
fn concrete(pattern: &str) -> String {
    pattern.replace("{id}", "merge-0123")
}

/// `%XX` of a byte, lower or upper case hex.
fn pct(b: u8, upper: bool) -> String {
    if upper {
        format!("%{b:02X}")
    } else {
        format!("%{b:02x}")
    }
}

/// Odd spellings of `path`: each character after a slash percent-encoded
/// (one at a time, and the whole path), `%76%31`-style prefixes,
/// double slashes, dot segments (plain and encoded), encoded slashes, a
/// trailing slash, case changes.
fn variants(path: &str) -> Vec<String> {
    let mut out = Vec::new();
    let bytes = path.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        if b != b'/' {
            for upper in [false, true] {
                out.push(format!("{}{}{}", &path[..i], pct(b, upper), &path[i + 1..]));
            }
        }
    }
    let all: String = bytes
        .iter()
        .map(|&b| {
            if b == b'/' {
                "/".to_string()
            } else {
                pct(b, false)
            }
        })
        .collect();
    out.push(all);
    let rest = path.trim_start_matches("/v1");
    out.push(format!("/%76%31{rest}"));
    out.push(format!("/%761{rest}"));
    out.push(format!("/{path}"));
    out.push(path.replacen("/v1/", "/v1//", 1));
    out.push(format!("{path}/"));
    out.push(format!("{path}//"));
    out.push(path.replacen("/v1/", "/v1/./", 1));
    out.push(path.replacen("/v1/", "/v1/%2e/", 1));
    out.push(path.replacen("/v1/", "/v1/%2E/", 1));
    out.push(format!("/x/..{path}"));
    out.push(format!("/x/%2e%2e{path}"));
    out.push(format!("/v1/x/..{rest}"));
    out.push(format!("{path}/."));
    out.push(path.replacen("/v1/", "/v1%2f", 1));
    out.push(path.replacen("/v1/", "/v1%2F", 1));
    out.push(path.replace('/', "%2f"));
    out.push(path.to_uppercase());
    out.push(format!("{path}?x=1"));
    out.push(format!("{path}#frag"));
    out.push(format!("{path};x=1"));
    out.push(format!("{path}%00"));
    out
}

/// Whether an answer is the refusal `denied`, the 404 of no route, or the
/// HTTP parser's bodiless 400 for a target that is no path.
fn refused(status: u16, body: &str, denied: u16) -> bool {
    status == denied
        || (status == 404 && body.contains("no route"))
        || (status == 400 && body.is_empty())
}

#[test]
fn odd_spellings_of_protected_routes_need_their_keys() {
    let pool = Pool::small();
    let server =
        start(pool.config_with_server("api_keys: [user-key], admin_keys: [admin-key]", ""));
    let base = server.url();

    // The spellings of the issue's report route, and need their keys.
    assert_eq!(raw(&base, "GET", "/%76%31/merges", None).0, 401);
    assert_eq!(raw(&base, "POST", "/%761/chat/completions", None).0, 401);
    assert_eq!(raw(&base, "GET", "/v1/%6derges", Some("user-key")).0, 403);
    // ...and reach their routes with the right key (so the refusals above
    // were decided on the route, not on a path that went nowhere).
    assert_eq!(
        raw(&base, "GET", "/%76%31/merges", Some("admin-key")).0,
        200
    );
    assert_eq!(raw(&base, "GET", "/v1/%6dodels", Some("user-key")).0, 200);

    let mut checked = 0;
    for &(pattern, access) in ROUTES {
        if access == Access::Public {
            continue;
        }
        let path = concrete(pattern);
        for v in variants(&path) {
            for method in ["GET", "POST", "DELETE"] {
                // No key: refused (401), routed nowhere (404), or not a
                // request target at all (400 from the HTTP parser, before
                // routing, with no body); never served.
                let (status, body) = raw(&base, method, &v, None);
                assert!(
                    refused(status, &body, 401),
                    "{method} {v} (route {pattern}) without a key: {status} {body}"
                );
                // A user key on an admin route: 403, nowhere, or no request.
                if access == Access::Admin {
                    let (status, body) = raw(&base, method, &v, Some("user-key"));
                    assert!(
                        refused(status, &body, 403),
                        "{method} {v} (route {pattern}) with a user key: {status} {body}"
                    );
                }
                checked += 1;
            }
        }
    }
    assert!(checked > 500, "{checked}");

    // Every route of the OpenAPI document has a class.
    let doc = gateway::openapi::document();
    let doc = serde_json::to_value(&doc).unwrap();
    for path in doc["paths"].as_object().unwrap().keys() {
        assert!(
            ROUTES.iter().any(|(p, _)| p == path),
            "{path} has no access class in gateway::auth::ROUTES"
        );
    }

    // The server still serves.
    assert_eq!(raw(&base, "GET", "/health/live", None).0, 200);
}
