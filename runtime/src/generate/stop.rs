//! Stop sequences over a stream of text deltas.
//!
//! Text that could be the start of a stop sequence is held back until the
//! next delta decides: either the stop sequence completes (generation stops,
//! and neither it nor anything after it is returned) or the match fails and
//! the held text is released. A stop sequence may span any number of tokens.

/// What one delta turned into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopStep {
    /// Text that is now safe to return.
    pub text: String,
    /// A stop sequence completed: generation must end.
    pub stopped: bool,
}

/// Watches the generated text for the first occurrence of any stop sequence.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
    stopped: bool,
}

impl StopMatcher {
    /// A matcher for `stops` (empty strings are ignored).
    pub fn new(stops: &[String]) -> Self {
        StopMatcher {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            held: String::new(),
            stopped: false,
        }
    }

    /// Text held back because it may start a stop sequence.
    pub fn held(&self) -> &str {
        &self.held
    }

    /// Feeds the next piece of generated text.
    pub fn push(&mut self, delta: &str) -> StopStep {
        if self.stopped {
            return StopStep {
                text: String::new(),
                stopped: true,
            };
        }
        if self.stops.is_empty() {
            return StopStep {
                text: delta.to_string(),
                stopped: false,
            };
        }
        self.held.push_str(delta);
        // Every match starts inside the held text: text released earlier was
        // not a prefix of any stop sequence, whatever followed it.
        let first = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min();
        if let Some(at) = first {
            self.stopped = true;
            let text = self.held[..at].to_string();
            self.held.clear();
            return StopStep {
                text,
                stopped: true,
            };
        }
        let keep = self.longest_partial_suffix();
        let cut = self.held.len() - keep;
        let text = self.held[..cut].to_string();
        self.held.drain(..cut);
        StopStep {
            text,
            stopped: false,
        }
    }

    /// Releases the held text at the end of generation (no more text can
    /// complete a stop sequence).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Length in bytes of the longest suffix of the held text that is a
    /// proper prefix of some stop sequence.
    fn longest_partial_suffix(&self) -> usize {
        let h = &self.held;
        h.char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let tail = &h[i..];
                self.stops.iter().any(|s| s.starts_with(tail))
            })
            .map_or(0, |i| h.len() - i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], deltas: &[&str]) -> (Vec<String>, bool, String) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut m = StopMatcher::new(&stops);
        let mut out = Vec::new();
        let mut stopped = false;
        for d in deltas {
            let step = m.push(d);
            out.push(step.text);
            if step.stopped {
                stopped = true;
                break;
            }
        }
        let rest = if stopped { String::new() } else { m.finish() };
        (out, stopped, rest)
    }

    #[test]
    fn no_stop_sequences_pass_text_through() {
        let (out, stopped, rest) = run(&[], &["ab", "c"]);
        assert_eq!(out, vec!["ab", "c"]);
        assert!(!stopped && rest.is_empty());
    }

    #[test]
    fn a_stop_inside_one_delta_cuts_it() {
        let (out, stopped, _) = run(&["\n\n"], &["ab\n\ncd"]);
        assert_eq!(out, vec!["ab"]);
        assert!(stopped);
    }

    #[test]
    fn a_stop_split_across_deltas_is_held_then_dropped() {
        // "END" arrives as "xE", "N", "D": "E" and "EN" are held, never returned.
        let (out, stopped, _) = run(&["END"], &["xE", "N", "Dtail"]);
        assert_eq!(out, vec!["x", "", ""]);
        assert!(stopped);
    }

    #[test]
    fn held_text_is_released_when_the_match_fails() {
        let (out, stopped, rest) = run(&["END"], &["xE", "N", "o", "E"]);
        // "EN" then "o": "ENo" cannot start "END" -> released.
        assert_eq!(out, vec!["x", "", "ENo", ""]);
        assert!(!stopped);
        assert_eq!(rest, "E");
    }

    #[test]
    fn the_earliest_of_several_stops_wins() {
        let (out, stopped, _) = run(&["cd", "b"], &["abcd"]);
        assert_eq!(out, vec!["a"]);
        assert!(stopped);
        // The longest possible start is held: "aab" for stop "aabx".
        let (out, _, rest) = run(&["aabx", "z"], &["aaab"]);
        assert_eq!(out, vec!["a"]);
        assert_eq!(rest, "aab");
    }

    #[test]
    fn multi_byte_characters_are_never_split() {
        let (out, stopped, _) = run(&["é!"], &["aé", "!"]);
        assert_eq!(out, vec!["a", ""]);
        assert!(stopped);
        let (out, _, rest) = run(&["éx"], &["éé"]);
        assert_eq!(out, vec!["é"]);
        assert_eq!(rest, "é");
    }
}
