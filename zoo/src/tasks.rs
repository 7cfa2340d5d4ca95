//! The synthetic tasks of the demo pool: seven small skills, each a
//! generator of items whose answers are correct by construction.
//!
//! | task       | kind              | skill                 | example                        |
//! |------------|-------------------|-----------------------|--------------------------------|
//! | `add`      | `generate`        | arithmetic            | `37+5=` → `42`                 |
//! | `reverse`  | `generate`        | reversal              | `rev kqzm=` → `mzqk`           |
//! | `sort`     | `generate`        | sorting               | `sort 5193=` → `1359`          |
//! | `upper`    | `generate`        | copy under a rule     | `up hwsp=` → `HWSP`            |
//! | `filter`   | `generate`        | selection             | `digits a3kb7=` → `37`         |
//! | `category` | `multiple_choice` | knowledge (word list) | `apple is a` → ` fruit` (of 5) |
//! | `compare`  | `multiple_choice` | comparison            | `37<52?` → ` yes` / ` no`      |
//!
//! Splits are drawn from a seeded ChaCha8 stream: the test split first, then
//! the train split without any test prompt, each without duplicates. The
//! `category` task is knowledge (a fixed word list), so its test split is the
//! whole list and its train split repeats the same words.

use std::collections::HashSet;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use runtime::generate::bytelevel::{encode_bytes, ASSISTANT, BOS, EOS, USER};

/// How a task is scored (the task-pool kinds of DESIGN.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    /// `{"prompt", "answer"}`, exact match of the greedy completion.
    Generate,
    /// `{"context", "choices", "gold"}`, the choice of highest log-likelihood.
    MultipleChoice,
}

impl TaskKind {
    /// The name used in task-pool files: `generate` or `multiple_choice`.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskKind::Generate => "generate",
            TaskKind::MultipleChoice => "multiple_choice",
        }
    }
}

/// One task item, serialised as one JSONL line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Item {
    /// A prompt and the exact answer expected after it.
    Generate {
        /// Text given to the model.
        prompt: String,
        /// The completion to produce (then end of sequence).
        answer: String,
    },
    /// A context and candidate continuations, one of them right.
    MultipleChoice {
        /// Text given to the model.
        context: String,
        /// Candidate continuations.
        choices: Vec<String>,
        /// Index of the right continuation in `choices`.
        gold: usize,
    },
}

impl Item {
    /// The text the model is given.
    pub fn prompt(&self) -> &str {
        match self {
            Item::Generate { prompt, .. } => prompt,
            Item::MultipleChoice { context, .. } => context,
        }
    }

    /// The right continuation.
    pub fn answer(&self) -> &str {
        match self {
            Item::Generate { answer, .. } => answer,
            Item::MultipleChoice { choices, gold, .. } => &choices[*gold],
        }
    }
}

/// How a prompt is wrapped into token ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `<s>{prompt}`: raw completion.
    Raw,
    /// `<s><|user|>{prompt}<|assistant|>`: the chat template with a
    /// generation prompt.
    Chat,
}

impl Format {
    /// Both formats, in report order.
    pub const ALL: [Format; 2] = [Format::Raw, Format::Chat];

    /// Token ids of `prompt` in this format.
    pub fn prefix(self, prompt: &str) -> Vec<u32> {
        let mut ids = vec![BOS];
        if self == Format::Chat {
            ids.push(USER);
        }
        ids.extend(encode_bytes(prompt));
        if self == Format::Chat {
            ids.push(ASSISTANT);
        }
        ids
    }

    /// A training sequence: the prefix, the answer and `</s>`, with the index
    /// of the first answer token.
    pub fn sequence(self, item: &Item) -> (Vec<u32>, usize) {
        let mut ids = self.prefix(item.prompt());
        let start = ids.len();
        ids.extend(encode_bytes(item.answer()));
        ids.push(EOS);
        (ids, start)
    }

    /// `raw` or `chat`.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Chat => "chat",
        }
    }
}

/// The words of the `category` task, by category.
pub const CATEGORIES: [(&str, [&str; 10]); 5] = [
    (
        "fruit",
        [
            "apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "pear", "plum",
            "melon",
        ],
    ),
    (
        "animal",
        [
            "horse", "tiger", "zebra", "mouse", "eagle", "shark", "whale", "sheep", "camel",
            "otter",
        ],
    ),
    (
        "color",
        [
            "red", "blue", "green", "yellow", "purple", "pink", "brown", "black", "white", "gray",
        ],
    ),
    (
        "tool",
        [
            "hammer", "saw", "drill", "wrench", "shovel", "chisel", "pliers", "rake", "axe",
            "ladder",
        ],
    ),
    (
        "country",
        [
            "france", "spain", "japan", "peru", "chile", "egypt", "kenya", "india", "italy",
            "brazil",
        ],
    ),
];

/// A synthetic task of the demo pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// A number below 100 plus a digit.
    Add,
    /// A lowercase string of 3 to 5 letters, reversed.
    Reverse,
    /// 4 to 6 digits in ascending order.
    Sort,
    /// A lowercase string of 3 to 7 letters in upper case.
    Upper,
    /// The digits of a string of 4 to 8 letters and digits, in order.
    Filter,
    /// The category of a word (multiple choice over the five categories).
    Category,
    /// Whether one two-digit number is below another (multiple choice).
    Compare,
}

impl Task {
    /// Every task, in pool order.
    pub const ALL: [Task; 7] = [
        Task::Add,
        Task::Reverse,
        Task::Sort,
        Task::Upper,
        Task::Filter,
        Task::Category,
        Task::Compare,
    ];

    /// The task's name (also its expert's name).
    pub fn name(self) -> &'static str {
        match self {
            Task::Add => "add",
            Task::Reverse => "reverse",
            Task::Sort => "sort",
            Task::Upper => "upper",
            Task::Filter => "filter",
            Task::Category => "category",
            Task::Compare => "compare",
        }
    }

    /// How the task is scored.
    pub fn kind(self) -> TaskKind {
        match self {
            Task::Category | Task::Compare => TaskKind::MultipleChoice,
            _ => TaskKind::Generate,
        }
    }

    /// Fine-tuning steps the skill needs, relative to the slowest (measured
    /// on the demo recipe: the fraction of the full run by which the expert
    /// is within a few points of its final accuracy, with some margin).
    pub fn effort(self) -> f64 {
        match self {
            Task::Add | Task::Reverse | Task::Filter => 1.0,
            Task::Sort => 0.8,
            Task::Compare => 0.7,
            Task::Upper => 0.6,
            Task::Category => 0.4,
        }
    }

    /// The task named `name`.
    pub fn from_name(name: &str) -> Option<Task> {
        Task::ALL.into_iter().find(|t| t.name() == name)
    }

    /// Draws one item.
    pub fn draw(self, rng: &mut ChaCha8Rng) -> Item {
        match self {
            Task::Add => {
                let (a, b) = (rng.random_range(0..100u32), rng.random_range(0..10u32));
                gen(format!("{a}+{b}="), (a + b).to_string())
            }
            Task::Reverse => {
                let w = letters(rng, b'a'..=b'z', 3..=5);
                gen(format!("rev {w}="), w.chars().rev().collect())
            }
            Task::Sort => {
                let d = letters(rng, b'0'..=b'9', 4..=6);
                let mut sorted: Vec<char> = d.chars().collect();
                sorted.sort_unstable();
                gen(format!("sort {d}="), sorted.into_iter().collect())
            }
            Task::Upper => {
                let w = letters(rng, b'a'..=b'z', 3..=7);
                gen(format!("up {w}="), w.to_ascii_uppercase())
            }
            Task::Category => {
                let (cat, words) = CATEGORIES[rng.random_range(0..CATEGORIES.len())];
                category_item(words[rng.random_range(0..words.len())], cat)
            }
            Task::Filter => {
                let len = rng.random_range(4..=8);
                let w: String = (0..len)
                    .map(|_| {
                        if rng.random_bool(0.5) {
                            rng.random_range(b'0'..=b'9') as char
                        } else {
                            rng.random_range(b'a'..=b'z') as char
                        }
                    })
                    .collect();
                let d: String = w.chars().filter(|c| c.is_ascii_digit()).collect();
                gen(format!("digits {w}="), d)
            }
            Task::Compare => {
                let a = rng.random_range(10..100u32);
                let mut b = rng.random_range(10..99u32);
                if b >= a {
                    b += 1;
                }
                Item::MultipleChoice {
                    context: format!("{a}<{b}?"),
                    choices: vec![" yes".into(), " no".into()],
                    gold: usize::from(a > b),
                }
            }
        }
    }

    /// Every item when the task is a fixed list (knowledge), else `None`.
    pub fn enumerate(self) -> Option<Vec<Item>> {
        match self {
            Task::Category => Some(
                CATEGORIES
                    .iter()
                    .flat_map(|(cat, words)| words.iter().map(move |w| category_item(w, cat)))
                    .collect(),
            ),
            _ => None,
        }
    }

    /// The train and test splits for `seed`: `n_test` distinct test items,
    /// then `n_train` distinct train items whose prompts are not in the test
    /// split (for the `category` list: the whole list, both splits).
    pub fn splits(self, seed: u64, n_train: usize, n_test: usize) -> Splits {
        if let Some(all) = self.enumerate() {
            return Splits {
                train: all.clone(),
                test: all,
            };
        }
        let mut rng = ChaCha8Rng::seed_from_u64(sub_seed(seed, &["split", self.name()]));
        let mut seen = HashSet::new();
        let test = self.distinct(&mut rng, n_test, &mut seen);
        let train = self.distinct(&mut rng, n_train, &mut seen);
        Splits { train, test }
    }

    /// Up to `n` items whose prompts are not in `seen` (which gets them);
    /// gives up after `50 n` draws, when the task has fewer distinct items.
    fn distinct(self, rng: &mut ChaCha8Rng, n: usize, seen: &mut HashSet<String>) -> Vec<Item> {
        let mut out = Vec::with_capacity(n);
        let mut draws = 0;
        while out.len() < n && draws < 50 * n {
            draws += 1;
            let item = self.draw(rng);
            if seen.insert(item.prompt().to_string()) {
                out.push(item);
            }
        }
        out
    }
}

/// A task's items.
#[derive(Debug, Clone)]
pub struct Splits {
    /// Training items.
    pub train: Vec<Item>,
    /// Held-out items (no prompt in common with `train`, except for
    /// knowledge tasks).
    pub test: Vec<Item>,
}

fn gen(prompt: String, answer: String) -> Item {
    Item::Generate { prompt, answer }
}

fn category_item(word: &str, category: &str) -> Item {
    Item::MultipleChoice {
        context: format!("{word} is a"),
        choices: CATEGORIES.iter().map(|(c, _)| format!(" {c}")).collect(),
        gold: CATEGORIES
            .iter()
            .position(|(c, _)| *c == category)
            .expect("a listed category"),
    }
}

/// A string of `len` (drawn from `lens`) characters drawn from `alphabet`.
fn letters(
    rng: &mut ChaCha8Rng,
    alphabet: std::ops::RangeInclusive<u8>,
    lens: std::ops::RangeInclusive<usize>,
) -> String {
    let len = rng.random_range(lens);
    (0..len)
        .map(|_| rng.random_range(alphabet.clone()) as char)
        .collect()
}

/// A seed derived from `seed` and labels (splitmix over the label bytes), so
/// every random stream of a build is independent and reproducible.
pub fn sub_seed(seed: u64, labels: &[&str]) -> u64 {
    let mut h = super::synth::splitmix(seed);
    for label in labels {
        for b in label.bytes().chain([0xFF]) {
            h = super::synth::splitmix(h ^ u64::from(b));
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(task: Task, n: usize) -> Vec<Item> {
        task.splits(3, n, 0).train
    }

    fn parse_gen(item: &Item) -> (&str, &str) {
        match item {
            Item::Generate { prompt, answer } => (prompt, answer),
            _ => panic!("expected a generate item: {item:?}"),
        }
    }

    #[test]
    fn add_answers_are_integer_sums() {
        for item in items(Task::Add, 300) {
            let (p, a) = parse_gen(&item);
            let (x, y) = p.strip_suffix('=').unwrap().split_once('+').unwrap();
            let (x, y): (u64, u64) = (x.parse().unwrap(), y.parse().unwrap());
            assert!(x < 100 && y < 10);
            assert_eq!(a.parse::<u64>().unwrap(), x + y, "{p}");
        }
    }

    #[test]
    fn reverse_sort_upper_and_filter_answers() {
        for item in items(Task::Reverse, 200) {
            let (p, a) = parse_gen(&item);
            let w = p.strip_prefix("rev ").unwrap().strip_suffix('=').unwrap();
            assert!((3..=6).contains(&w.len()));
            let back: Vec<u8> = a.bytes().rev().collect();
            assert_eq!(back, w.as_bytes());
        }
        for item in items(Task::Sort, 200) {
            let (p, a) = parse_gen(&item);
            let d = p.strip_prefix("sort ").unwrap().strip_suffix('=').unwrap();
            // Same multiset of digits, non-decreasing.
            let mut hist = [0i32; 10];
            d.bytes().for_each(|b| hist[(b - b'0') as usize] += 1);
            a.bytes().for_each(|b| hist[(b - b'0') as usize] -= 1);
            assert_eq!(hist, [0; 10], "{p} -> {a}");
            assert!(a.as_bytes().windows(2).all(|w| w[0] <= w[1]), "{a}");
        }
        for item in items(Task::Upper, 200) {
            let (p, a) = parse_gen(&item);
            let w = p.strip_prefix("up ").unwrap().strip_suffix('=').unwrap();
            assert_eq!(a.len(), w.len());
            for (x, y) in w.bytes().zip(a.bytes()) {
                assert_eq!(y, x - 32);
            }
        }
        for item in items(Task::Filter, 200) {
            let (p, a) = parse_gen(&item);
            let w = p
                .strip_prefix("digits ")
                .unwrap()
                .strip_suffix('=')
                .unwrap();
            assert!((4..=8).contains(&w.len()));
            // Walk the string, consuming the answer digit by digit.
            let mut rest = a.as_bytes();
            for b in w.bytes() {
                if b.is_ascii_digit() {
                    assert_eq!(rest[0], b, "{p} -> {a}");
                    rest = &rest[1..];
                } else {
                    assert!(b.is_ascii_lowercase());
                }
            }
            assert!(rest.is_empty(), "{p} -> {a}");
        }
    }

    #[test]
    fn multiple_choice_golds() {
        let mut golds = [0; 2];
        for item in items(Task::Compare, 200) {
            let Item::MultipleChoice {
                context,
                choices,
                gold,
            } = &item
            else {
                panic!("{item:?}")
            };
            let (a, b) = context.strip_suffix('?').unwrap().split_once('<').unwrap();
            let (a, b): (u32, u32) = (a.parse().unwrap(), b.parse().unwrap());
            assert_ne!(a, b);
            assert_eq!(choices, &[" yes", " no"]);
            assert_eq!(choices[*gold] == " yes", a < b, "{context}");
            golds[*gold] += 1;
        }
        // Both answers are common (no prior to exploit).
        assert!(golds[0] > 60 && golds[1] > 60, "{golds:?}");
        let all = Task::Category.enumerate().unwrap();
        assert_eq!(all.len(), 50);
        let apple = all.iter().find(|i| i.prompt() == "apple is a").unwrap();
        assert_eq!(apple.answer(), " fruit");
        let axe = all.iter().find(|i| i.prompt() == "axe is a").unwrap();
        assert_eq!(axe.answer(), " tool");
    }

    #[test]
    fn splits_are_disjoint_distinct_and_seeded() {
        for task in Task::ALL {
            if task == Task::Category {
                continue;
            }
            let s = task.splits(9, 500, 100);
            assert_eq!((s.train.len(), s.test.len()), (500, 100), "{}", task.name());
            assert!(
                s.test.iter().all(|i| i.prompt().len() < 20),
                "short prompts"
            );
            let mut prompts = HashSet::new();
            for item in s.test.iter().chain(&s.train) {
                assert!(prompts.insert(item.prompt()), "duplicate {item:?}");
            }
            assert_eq!(task.splits(9, 500, 100).train, s.train);
            assert_ne!(task.splits(10, 500, 100).test, s.test);
        }
        // `add` has exactly 100 * 10 distinct prompts; asking for more stops there.
        let s = Task::Add.splits(1, 5_000, 0);
        assert_eq!(s.train.len(), 1_000);
    }

    #[test]
    fn formats_wrap_prompts() {
        let item = gen("1+2=".into(), "3".into());
        let (ids, start) = Format::Raw.sequence(&item);
        assert_eq!(ids, vec![BOS, 49, 43, 50, 61, 51, EOS]);
        assert_eq!(start, 5);
        let (ids, start) = Format::Chat.sequence(&item);
        assert_eq!(ids, vec![BOS, USER, 49, 43, 50, 61, ASSISTANT, 51, EOS]);
        assert_eq!(start, 7);
        let json = serde_json::to_string(&item).unwrap();
        assert_eq!(json, r#"{"prompt":"1+2=","answer":"3"}"#);
        let back: Item = serde_json::from_str(&json).unwrap();
        assert_eq!(back, item);
    }
}
