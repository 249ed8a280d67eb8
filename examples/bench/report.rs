//! The one markdown table the bench prints, and the functional failures that make it exit non-zero.

pub(crate) struct Row {
    pub(crate) order: u32,
    pub(crate) what: String,
    pub(crate) result: String,
    pub(crate) target: String,
    pub(crate) met: Option<bool>,
    pub(crate) cpu: String,
}

#[derive(Default)]
pub(crate) struct Report {
    pub(crate) rows: Vec<Row>,
    pub(crate) bridge: BridgeTable,
    pub(crate) failures: Vec<String>,
}

impl Report {
    pub(crate) fn row(
        &mut self,
        order: u32,
        what: &str,
        result: String,
        target: &str,
        met: Option<bool>,
        cpu: String,
    ) {
        eprintln!("bench: [{what}] {result}");
        self.rows.push(Row {
            order,
            what: what.to_string(),
            result,
            target: target.to_string(),
            met,
            cpu,
        });
    }

    /// A functional check: failing it makes the exit code non-zero.
    pub(crate) fn check(&mut self, ok: bool, what: String) -> bool {
        if !ok {
            eprintln!("bench: FUNCTIONAL FAILURE: {what}");
            self.failures.push(what);
        }
        ok
    }

    pub(crate) fn print(&mut self, quick: bool) {
        self.rows.sort_by_key(|r| r.order);
        println!();
        if quick {
            println!("(--quick: tiny N and ~1 s phases, a smoke test; the numbers mean nothing about speed)");
            println!();
        }
        println!("| measurement | result | target | met | CPU, % of one core (same phase) |");
        println!("| --- | --- | --- | --- | --- |");
        for r in &self.rows {
            let met = match r.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "—",
            };
            println!(
                "| {} | {} | {} | {} | {} |",
                r.what,
                r.result,
                if r.target.is_empty() {
                    "—"
                } else {
                    &r.target
                },
                met,
                if r.cpu.is_empty() { "—" } else { &r.cpu }
            );
        }
        println!();
        self.bridge.print();
    }
}

/// The bridges compared, one column each per QoS, in the order they run.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Bridge {
    Onboardd,
    MosquittoOff,
    MosquittoOn,
}

impl Bridge {
    pub(crate) const ALL: [Bridge; 3] =
        [Bridge::Onboardd, Bridge::MosquittoOff, Bridge::MosquittoOn];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Bridge::Onboardd => "onboardd",
            Bridge::MosquittoOff => "mosquitto bridge (persistence off)",
            Bridge::MosquittoOn => "mosquitto bridge (persistence on, autosave 1 s)",
        }
    }

    fn column(self, qos0: bool) -> usize {
        usize::from(qos0) * 3 + self as usize
    }
}

/// How a bridge row's onboardd figure is held against its target.
#[derive(Clone, Copy)]
pub(crate) enum Rule {
    /// No target.
    None,
    /// onboardd's value is at most this.
    AtMost(f64),
    /// onboardd's value ÷ the mosquitto bridge's (persistence off) is at least this.
    RatioAtLeast(f64),
    /// onboardd's value ÷ the mosquitto bridge's (persistence off) is at most this.
    RatioAtMost(f64),
}

pub(crate) struct Cell {
    pub(crate) value: f64,
    pub(crate) text: String,
}

struct BridgeRow {
    what: String,
    target: String,
    rule: Rule,
    cells: [Option<Cell>; 6],
}

/// The bridge table: one row per measurement, onboardd next to a plain mosquitto bridge
/// (persistence off and on), QoS 1 and QoS 0, all from one run.
#[derive(Default)]
pub(crate) struct BridgeTable {
    rows: std::collections::BTreeMap<u32, BridgeRow>,
}

impl BridgeTable {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn set(
        &mut self,
        order: u32,
        what: &str,
        target: &str,
        rule: Rule,
        bridge: Bridge,
        qos0: bool,
        cell: Cell,
    ) {
        eprintln!(
            "bench: [{what}, {}, QoS {}] {}",
            bridge.name(),
            u8::from(!qos0),
            cell.text
        );
        let row = self.rows.entry(order).or_insert_with(|| BridgeRow {
            what: what.to_string(),
            target: target.to_string(),
            rule,
            cells: Default::default(),
        });
        row.cells[bridge.column(qos0)] = Some(cell);
    }

    /// Whether onboardd's figure at this QoS meets the row's target, and the ratio
    /// to the mosquitto bridge (persistence off) when the target is one.
    fn judge(row: &BridgeRow, qos0: bool) -> (Option<bool>, Option<f64>) {
        let ours = row.cells[Bridge::Onboardd.column(qos0)].as_ref();
        let theirs = row.cells[Bridge::MosquittoOff.column(qos0)].as_ref();
        let ratio = ours
            .zip(theirs)
            .filter(|(_, t)| t.value > 0.0)
            .map(|(o, t)| o.value / t.value);
        let met = match row.rule {
            Rule::None => None,
            Rule::AtMost(x) => ours.map(|o| o.value <= x),
            Rule::RatioAtLeast(x) => ratio.map(|r| r >= x),
            Rule::RatioAtMost(x) => ratio.map(|r| r <= x),
        };
        (met, ratio)
    }

    pub(crate) fn print(&self) {
        if self.rows.is_empty() {
            return;
        }
        let mut head = vec!["measurement".to_string()];
        for qos0 in [false, true] {
            for b in Bridge::ALL {
                head.push(format!("{}, QoS {}", b.name(), u8::from(!qos0)));
            }
        }
        head.extend(["target".into(), "met (QoS 1 · QoS 0)".into()]);
        println!("| {} |", head.join(" | "));
        println!("|{}", " --- |".repeat(head.len()));
        for row in self.rows.values() {
            let mut line = vec![row.what.clone()];
            let mut verdicts = Vec::new();
            for qos0 in [false, true] {
                let (met, ratio) = Self::judge(row, qos0);
                for b in Bridge::ALL {
                    let mut text = row.cells[b.column(qos0)]
                        .as_ref()
                        .map_or("—".to_string(), |c| c.text.clone());
                    if b == Bridge::Onboardd {
                        if let (Some(r), Rule::RatioAtLeast(_) | Rule::RatioAtMost(_)) =
                            (ratio, row.rule)
                        {
                            text.push_str(&format!(" = **{r:.2} ×** mosquitto (persistence off)"));
                        }
                    }
                    line.push(text);
                }
                verdicts.push(match met {
                    Some(true) => "yes",
                    Some(false) => "**no**",
                    None => "—",
                });
            }
            line.push(if row.target.is_empty() {
                "—".into()
            } else {
                row.target.clone()
            });
            line.push(verdicts.join(" · "));
            println!("| {} |", line.join(" | "));
        }
        println!();
    }
}
