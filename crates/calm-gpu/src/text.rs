//! Text shown to users: every message is one printable line, whatever a file or a path held.

/// `text` as one printable line: line breaks and other control characters (a file's header
/// quoted in an error, a path with a newline, terminal escape sequences) are shown escaped, as
/// `\n` or `\u{1b}`, and text past `max_chars` characters is cut with a count of what was left
/// out.
pub fn printable(text: &str, max_chars: usize) -> String {
    let mut out = String::new();
    let mut chars = text.chars();
    for c in chars.by_ref().take(max_chars) {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    let left = chars.count();
    if left > 0 {
        out.push_str(&format!("... ({left} more characters)"));
    }
    out
}
