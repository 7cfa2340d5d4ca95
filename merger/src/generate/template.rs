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

use crate::error::{MergeError, Result};

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
                    .map_err(|e| MergeError::Template(format!("does not compile: {e:#}")))?;
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
            return Err(MergeError::Template("`messages` is empty".into()));
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
            .map_err(|e| MergeError::Template(e.to_string()))?;
        tmpl.render(context! {
            messages => messages,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
            add_generation_prompt => add_generation_prompt,
        })
        .map_err(|e| MergeError::Template(format!("{e:#}")))
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
