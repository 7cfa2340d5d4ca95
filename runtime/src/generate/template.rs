//! Chat templates: the Jinja `chat_template` of tokenizer_config.json,
//! rendered with minijinja the way Hugging Face transformers renders it
//! (`trim_blocks` and `lstrip_blocks` on, Python string/dict/list methods
//! through minijinja-contrib's pycompat, a `raise_exception(message)`
//! function, the variables `messages`, `bos_token`, `eos_token` and
//! `add_generation_prompt`).
//!
//! Without a template the fallback is one `"{role}: {content}\n"` line per
//! message, then `"assistant: "` as the generation prompt (no special
//! tokens).

use minijinja::{context, Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::error::{Result, RuntimeError};

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, … (passed to the template as is).
    pub role: String,
    /// The text of the message.
    pub content: String,
}

impl ChatMessage {
    /// A message from `role`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

const NAME: &str = "chat_template";

/// A compiled chat template (or the documented fallback).
#[derive(Debug)]
pub struct ChatTemplate {
    env: Option<Environment<'static>>,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// Compiles `source`; `None` selects the fallback. The special tokens
    /// are exposed as `bos_token` / `eos_token` (empty strings when unset).
    pub fn new(
        source: Option<&str>,
        bos_token: Option<&str>,
        eos_token: Option<&str>,
    ) -> Result<Self> {
        let env = match source {
            None => None,
            Some(src) => {
                let mut env = Environment::new();
                env.set_trim_blocks(true);
                env.set_lstrip_blocks(true);
                env.set_unknown_method_callback(
                    minijinja_contrib::pycompat::unknown_method_callback,
                );
                env.add_function("raise_exception", raise_exception);
                env.add_template_owned(NAME, src.to_string())
                    .map_err(|e| RuntimeError::Template(format!("does not compile: {e:#}")))?;
                Some(env)
            }
        };
        Ok(ChatTemplate {
            env,
            bos_token: bos_token.unwrap_or_default().to_string(),
            eos_token: eos_token.unwrap_or_default().to_string(),
        })
    }

    /// Whether this is the fallback (no `chat_template` in the config).
    pub fn is_fallback(&self) -> bool {
        self.env.is_none()
    }

    /// Renders `messages`, ending with the generation prompt when
    /// `add_generation_prompt`.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        if messages.is_empty() {
            return Err(RuntimeError::Template("`messages` is empty".into()));
        }
        let Some(env) = &self.env else {
            let mut out = String::new();
            for m in messages {
                out.push_str(&format!("{}: {}\n", m.role, m.content));
            }
            if add_generation_prompt {
                out.push_str("assistant: ");
            }
            return Ok(out);
        };
        let tmpl = env
            .get_template(NAME)
            .map_err(|e| RuntimeError::Template(e.to_string()))?;
        tmpl.render(context! {
            messages => messages,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
            add_generation_prompt => add_generation_prompt,
        })
        .map_err(|e| RuntimeError::Template(format!("{e:#}")))
    }
}

/// A rendered conversation and the byte ranges of it that are message
/// content (what a client wrote, as opposed to what the template added).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedChat {
    /// The rendered text, exactly as [`ChatTemplate::render`] returns it.
    pub text: String,
    /// Byte ranges of `text` that came from `messages[..].content`, sorted.
    pub content: Vec<std::ops::Range<usize>>,
}

/// Marks message `i`'s content while rendering: private-use code points a
/// template passes through untouched.
fn marker(i: usize) -> String {
    format!("\u{F0000}{i}\u{F0001}")
}

impl ChatTemplate {
    /// Renders `messages` like [`ChatTemplate::render`] and says which parts
    /// of the text are message content. The template is rendered with a
    /// marker in place of each content and the content put back at each
    /// marker; the result must equal the plain rendering (a template that
    /// trims content is followed; one that otherwise rewrites it is an
    /// error, since its content could not be told from its own text).
    pub fn render_with_content(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<RenderedChat> {
        let plain = self.render(messages, add_generation_prompt)?;
        let marked: Vec<ChatMessage> = messages
            .iter()
            .enumerate()
            .map(|(i, m)| ChatMessage::new(m.role.clone(), marker(i)))
            .collect();
        let with_markers = self.render(&marked, add_generation_prompt)?;
        for trim in [false, true] {
            let mut text = String::with_capacity(plain.len());
            let mut content = Vec::new();
            let mut rest = with_markers.as_str();
            while let Some(start) = rest.find('\u{F0000}') {
                let after = &rest[start + '\u{F0000}'.len_utf8()..];
                let Some(end) = after.find('\u{F0001}') else {
                    break;
                };
                let Ok(i) = after[..end].parse::<usize>() else {
                    break;
                };
                let Some(m) = messages.get(i) else { break };
                text.push_str(&rest[..start]);
                let c = if trim { m.content.trim() } else { &m.content };
                if !c.is_empty() {
                    content.push(text.len()..text.len() + c.len());
                }
                text.push_str(c);
                rest = &after[end + '\u{F0001}'.len_utf8()..];
            }
            text.push_str(rest);
            if text == plain {
                return Ok(RenderedChat { text, content });
            }
        }
        Err(RuntimeError::Template(
            "the chat template rewrites message content, so the content cannot be told apart \
             from the template's own special tokens; encode content with special tokens parsed \
             (the Hugging Face default) to use this template"
                .into(),
        ))
    }
}

fn raise_exception(message: String) -> std::result::Result<String, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::bytelevel::CHAT_TEMPLATE;

    #[test]
    fn the_demo_template_renders_turns_and_the_generation_prompt() {
        let t = ChatTemplate::new(Some(CHAT_TEMPLATE), Some("<s>"), Some("</s>")).unwrap();
        let msgs = [
            ChatMessage::new("system", "be brief"),
            ChatMessage::new("user", "hi"),
            ChatMessage::new("assistant", "yo"),
            ChatMessage::new("user", "2+2"),
        ];
        assert_eq!(
            t.render(&msgs, true).unwrap(),
            "<s><|system|>be brief</s><|user|>hi<|assistant|>yo</s><|user|>2+2<|assistant|>"
        );
        assert_eq!(t.render(&msgs[3..], false).unwrap(), "<s><|user|>2+2");
    }

    #[test]
    fn huggingface_features_work() {
        // A Llama-2-style template: raise_exception, pycompat methods
        // (strip, title), loop variables and whitespace control of blocks.
        let src = "{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'].strip() %}{% set msgs = messages[1:] %}{% else %}{% set sys = '' %}{% set msgs = messages %}{% endif %}
{% for m in msgs %}
  {% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}
    {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
  {% endif %}
  {% if m['role'] == 'user' %}
{{ bos_token }}[INST] {% if loop.first and sys %}<<SYS>>{{ sys }}<</SYS>> {% endif %}{{ m['content'] }} [/INST]
  {% else %}
 {{ m['content'].title() }} {{ eos_token }}
  {% endif %}
{% endfor %}";
        let t = ChatTemplate::new(Some(src), Some("<s>"), Some("</s>")).unwrap();
        let ok = [
            ChatMessage::new("system", "  terse "),
            ChatMessage::new("user", "hi"),
            ChatMessage::new("assistant", "hello there"),
        ];
        assert_eq!(
            t.render(&ok, true).unwrap(),
            "<s>[INST] <<SYS>>terse<</SYS>> hi [/INST]\n Hello There </s>\n"
        );
        let bad = [ChatMessage::new("assistant", "first")];
        let e = t.render(&bad, true).unwrap_err().to_string();
        assert!(e.contains("must alternate"), "{e}");
    }

    #[test]
    fn the_fallback_is_role_lines() {
        let t = ChatTemplate::new(None, None, None).unwrap();
        assert!(t.is_fallback());
        let msgs = [
            ChatMessage::new("system", "s"),
            ChatMessage::new("user", "u"),
        ];
        assert_eq!(
            t.render(&msgs, true).unwrap(),
            "system: s\nuser: u\nassistant: "
        );
        assert_eq!(t.render(&msgs, false).unwrap(), "system: s\nuser: u\n");
    }

    #[test]
    fn bad_templates_and_empty_conversations_are_errors() {
        let e = ChatTemplate::new(Some("{% for %}"), None, None).unwrap_err();
        assert!(
            e.to_string().starts_with("chat template: does not compile"),
            "{e}"
        );
        let t = ChatTemplate::new(Some("{{ messages[0].content }}"), None, None).unwrap();
        assert!(t.render(&[], true).is_err());
    }
}
