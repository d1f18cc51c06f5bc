//! `marlin chat`: a multi-turn conversation on the terminal.

use crate::session::{ModelArgs, SamplingArgs, Session};
use anyhow::Result;
use clap::Args;
use marlin_engine::{Event, Request};
use marlin_model::ChatMessage;
use std::io::{BufRead, Write};

#[derive(Args, Debug)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A system message that opens the conversation
    #[arg(long)]
    pub system: Option<String>,
    /// Most tokens per reply
    #[arg(long, default_value_t = 512)]
    pub max_tokens: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

pub fn run(args: ChatArgs) -> Result<()> {
    let mut session = Session::load(&args.model)?;
    let mut messages: Vec<ChatMessage> = args
        .system
        .iter()
        .map(|s| ChatMessage::new("system", s.clone()))
        .collect();
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    eprintln!(
        "chatting with {} — /reset clears the conversation, /exit or Ctrl-D leaves",
        session.files_path.display()
    );
    loop {
        write!(out, "> ")?;
        out.flush()?;
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            writeln!(out)?;
            return Ok(());
        }
        let line = line.trim();
        match line {
            "" => continue,
            "/exit" | "/quit" => return Ok(()),
            "/reset" => {
                messages.truncate(usize::from(args.system.is_some()));
                continue;
            }
            _ => {}
        }
        messages.push(ChatMessage::new("user", line));
        let text = session.chat_template()?.render(&messages, true)?;
        let prompt = session.engine.tokenizer().encode(&text, false)?;
        let request = Request {
            prompt,
            sampling: args.sampling.params(&session.generation),
            max_tokens: args.max_tokens,
            stop: Vec::new(),
            stop_token_ids: session.stop_token_ids.clone(),
        };
        let mut reply = String::new();
        let generation = match session.engine.generate(request) {
            Ok(g) => g,
            Err(e) => {
                eprintln!("error: {e}");
                messages.pop();
                continue;
            }
        };
        for events in generation {
            for event in events? {
                if let Event::Text(piece) = event {
                    out.write_all(piece.as_bytes())?;
                    out.flush()?;
                    reply.push_str(&piece);
                }
            }
        }
        writeln!(out)?;
        messages.push(ChatMessage::new("assistant", reply.trim()));
    }
}
