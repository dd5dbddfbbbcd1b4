//! The cluster head as a [`Backend`] of the OpenAI API: requests are checked against the model
//! here, then admitted by the head's scheduler.

use std::path::Path;

use baton_api::backend::{Backend, BackendStats, GenerationRequest, SubmitError, TokenStream};
use baton_model::loader::ModelSource;
use baton_model::tokenizer::Tokenizer;

use crate::head::{Head, Result};

pub struct ClusterBackend {
    head: Head,
    model_id: String,
    tokenizer: Tokenizer,
    context_length: usize,
}

impl ClusterBackend {
    /// The API's view of a running head serving `model` (the same file the head loaded; only its
    /// headers and tokenizer are read). `model_id` defaults to the file name without extension.
    pub fn new(head: Head, model: &Path, model_id: Option<String>) -> Result<Self> {
        let source = ModelSource::open(model)?;
        let tokenizer = source.tokenizer()?;
        let context_length = source.config().context_length;
        let model_id = model_id.unwrap_or_else(|| {
            model.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into())
        });
        Ok(Self { head, model_id, tokenizer, context_length })
    }

    pub fn head(&self) -> &Head {
        &self.head
    }
}

impl Backend for ClusterBackend {
    fn model_id(&self) -> &str {
        &self.model_id
    }

    fn context_length(&self) -> usize {
        self.context_length
    }

    fn readiness(&self) -> std::result::Result<(), String> {
        self.head.readiness()
    }

    fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    fn submit(&self, req: GenerationRequest) -> std::result::Result<TokenStream, SubmitError> {
        self.readiness().map_err(SubmitError::NotReady)?;
        req.check(&self.tokenizer, self.context_length)?;
        self.head.submit(req)
    }

    fn stats(&self) -> BackendStats {
        self.head.stats()
    }
}
