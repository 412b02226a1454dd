//! The user flags gene: the RFLAGS bits the user workload sets before its system calls and
//! ring-3 points (`Schedule::user_flags`), drawn by the generator and changed by
//! [`ChangeUserFlags`].

use std::borrow::Cow;

use libafl::Error;
use libafl::corpus::CorpusId;
use libafl::mutators::{MutationResult, Mutator};
use libafl::state::HasRand;
use libafl_bolts::Named;
use libafl_bolts::rands::Rand;
use nmifuzz_abi::USER_FLAG_SLOTS;
use vmm::engine::schedule::{UserFlag, Workload};

use super::NmiInput;

/// Most sets of user flags the generator draws.
pub const GENERATED_FLAG_SETS: usize = 3;

/// The flags an entry from ring 3 must not let into the kernel: drawn as often as the six
/// arithmetic flags together.
const UNTRUSTED: [UserFlag; 3] = [UserFlag::Df, UserFlag::Ac, UserFlag::Nt];

/// One set of user RFLAGS bits: one or two flags.
fn random_set<R: Rand>(rand: &mut R) -> Vec<UserFlag> {
    let mut set: Vec<UserFlag> = (0..rand.between(1, 2)).map(|_| random_flag(rand)).collect();
    set.sort_by_key(|f| f.bit());
    set.dedup();
    set
}

fn random_flag<R: Rand>(rand: &mut R) -> UserFlag {
    if rand.coinflip(0.5) {
        UNTRUSTED[rand.below_or_zero(UNTRUSTED.len())]
    } else {
        UserFlag::ALL[rand.below_or_zero(UserFlag::ALL.len())]
    }
}

/// 1 to [`GENERATED_FLAG_SETS`] sets of user flags.
pub fn random_user_flags<R: Rand>(rand: &mut R) -> Vec<Vec<UserFlag>> {
    (0..rand.between(1, GENERATED_FLAG_SETS)).map(|_| random_set(rand)).collect()
}

/// Changes the user flags of a user schedule: adds a set (up to the script's slots), removes
/// one, or toggles one flag in one; skipped for the loop workload, which never reads them.
pub struct ChangeUserFlags;

impl Named for ChangeUserFlags {
    fn name(&self) -> &Cow<'static, str> {
        static NAME: Cow<'static, str> = Cow::Borrowed("ChangeUserFlags");
        &NAME
    }
}

impl<S: HasRand> Mutator<NmiInput, S> for ChangeUserFlags {
    fn mutate(&mut self, state: &mut S, input: &mut NmiInput) -> Result<MutationResult, Error> {
        let schedule = &mut input.0;
        if schedule.workload != Workload::User {
            return Ok(MutationResult::Skipped);
        }
        let rand = state.rand_mut();
        let sets = &mut schedule.user_flags;
        match rand.below_or_zero(3) {
            0 if sets.len() < USER_FLAG_SLOTS => {
                let at = rand.below_or_zero(sets.len() + 1);
                sets.insert(at, random_set(rand));
            }
            1 if !sets.is_empty() => {
                sets.remove(rand.below_or_zero(sets.len()));
            }
            _ if !sets.is_empty() => {
                let at = rand.below_or_zero(sets.len());
                let set = &mut sets[at];
                let flag = random_flag(rand);
                match set.iter().position(|&f| f == flag) {
                    Some(i) => {
                        set.remove(i);
                    }
                    None => {
                        set.push(flag);
                        set.sort_by_key(|f| f.bit());
                    }
                }
            }
            _ => sets.push(random_set(rand)),
        }
        Ok(MutationResult::Mutated)
    }

    fn post_exec(&mut self, _: &mut S, _: Option<CorpusId>) -> Result<(), Error> {
        Ok(())
    }
}
