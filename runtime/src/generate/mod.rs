//! Text generation: tokenizer, chat template, sampling, KV cache, token
//! stream and log-likelihoods on top of the [`crate::model`] runtime.
//!
//! [`TextModel`] is the entry point: load a checkpoint folder (or wrap merged
//! weights with the base's tokenizer files), render a conversation with
//! [`TextModel::apply_chat_template`], [`TextModel::encode`] it and
//! [`TextModel::generate`] with [`SamplingParams`], receiving a
//! [`TokenEvent`] per token; score continuations with
//! [`TextModel::loglikelihood`].

pub mod bytelevel;
pub mod detokenize;
pub mod sampling;
pub mod scheduler;
pub mod scoring;
pub mod sequence;
pub mod stop;
pub mod template;
pub mod text_model;
pub mod tokenizer;

#[cfg(test)]
mod tests;

pub use detokenize::StreamDecoder;
pub use sampling::{Sampler, SamplingParams};
pub use scheduler::{
    EventSink, NoObserver, Priority, Scheduler, SchedulerEvent, SchedulerLimits, StepObserver,
};
pub use scoring::{LogLikelihood, ScoreRequest};
pub use sequence::Sequence;
pub use stop::{StopMatcher, StopStep};
pub use template::{ChatMessage, ChatTemplate, RenderedChat};
pub use text_model::{Completion, FinishReason, TextModel, TokenEvent};
pub use tokenizer::{TextTokenizer, TokenizerConfig};
