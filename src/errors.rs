//! Showing an error to a person: the error and its causes on one line, each cause only when its
//! text is not already part of what is shown. Typed errors often embed their source's message
//! (`"{path}: {source}"`), and printing the chain naively repeats it two or three times.

/// Join an error's messages (outermost first), skipping any already contained in the result.
pub fn join_unique<I: IntoIterator<Item = String>>(messages: I) -> String {
    let mut shown = String::new();
    for text in messages {
        if text.is_empty() || shown.contains(&text) {
            continue;
        }
        if !shown.is_empty() {
            shown.push_str(": ");
        }
        shown.push_str(&text);
    }
    shown
}

/// A `std::error::Error` and its `source()` chain, each message once.
pub fn render_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut messages = Vec::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        messages.push(err.to_string());
        cur = err.source();
    }
    join_unique(messages)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("{path}: {source}")]
    struct Outer {
        path: String,
        #[source]
        source: std::io::Error,
    }

    #[test]
    fn causes_already_shown_are_not_repeated() {
        let e = Outer {
            path: "data/x.sqlite".into(),
            source: std::io::Error::other("database or disk is full"),
        };
        assert_eq!(render_chain(&e), "data/x.sqlite: database or disk is full");
    }
}
