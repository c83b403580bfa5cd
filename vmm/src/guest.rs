//! The guest: 89 bytes of hand-assembled 32-bit x86 code (no assembler at build time, no
//! kernel image), its port-I/O protocol and a model of what its checksum must be.
//!
//! The vCPU starts in flat 32-bit protected mode without paging (set up through
//! `KVM_SET_SREGS`, see `vm.rs`), so guest physical addresses are linear addresses and the
//! code can reach every byte of guest memory. Nothing uses a stack, interrupts or a
//! descriptor table in memory: the nested host here emulates the guest's kernel-mode code,
//! so the instructions are the plainest there are (`mov`, `xor`, `add`, `rol`, `dec`,
//! `jcc`, `in`, `out`, `hlt`).
//!
//! The protocol: the guest reads a command and four arguments with `in eax, dx`, runs it,
//! reports with `out dx, eax`, and asks again. [`Command::Halt`] executes `hlt`, which exits
//! to the VMM with the vCPU at a clean point (nothing pending): that is where snapshots are
//! taken, and the next `KVM_RUN` resumes at the `jmp` back to the top.

/// Guest physical address the code is loaded at (and the vCPUs start at).
pub const CODE_GPA: u64 = 0x1000;
/// Guest physical address of the first data page; everything below holds the code.
pub const DATA_GPA: u64 = 0x10000;
/// The guest's page size for its data (it touches two words of every 4 KiB page).
pub const GUEST_PAGE: u64 = 4096;

/// Port the guest reads its next command from.
pub const PORT_COMMAND: u16 = 0x10;
/// Port the guest reads the command's four arguments from, in order: first page's guest
/// physical address, page count, seed, stride in bytes.
pub const PORT_ARGS: u16 = 0x11;
/// Port the guest writes its result to: the checksum, or the command number once done.
pub const PORT_RESULT: u16 = 0x12;

/// The guest program. Registers: ebx command, esi page address, ecx pages left, edi seed,
/// ebp stride; eax is the accumulator. Offsets are from [`CODE_GPA`].
#[rustfmt::skip]
pub const CODE: [u8; 0x59] = [
    // 0x00 loop:
    0x66, 0xBA, 0x10, 0x00,             // mov dx, PORT_COMMAND
    0xED,                               // in eax, dx            ; the command
    0x89, 0xC3,                         // mov ebx, eax
    0x66, 0xBA, 0x11, 0x00,             // mov dx, PORT_ARGS
    0xED,                               // in eax, dx            ; first page address
    0x89, 0xC6,                         // mov esi, eax
    0xED,                               // in eax, dx            ; page count (never 0)
    0x89, 0xC1,                         // mov ecx, eax
    0xED,                               // in eax, dx            ; seed
    0x89, 0xC7,                         // mov edi, eax
    0xED,                               // in eax, dx            ; stride in bytes
    0x89, 0xC5,                         // mov ebp, eax
    0x83, 0xFB, 0x01,                   // cmp ebx, 1
    0x74, 0x08,                         // je fill (0x24)
    0x83, 0xFB, 0x02,                   // cmp ebx, 2
    0x74, 0x1F,                         // je sum (0x40)
    0xF4,                               // hlt                   ; any other command
    0xEB, 0xDC,                         // jmp loop
    // 0x24 fill: word 0 = address ^ seed, last word = its complement
    0x89, 0xF0,                         // mov eax, esi
    0x31, 0xF8,                         // xor eax, edi
    0x89, 0x06,                         // mov [esi], eax
    0xF7, 0xD0,                         // not eax
    0x89, 0x86, 0xFC, 0x0F, 0x00, 0x00, // mov [esi+0xFFC], eax
    0x01, 0xEE,                         // add esi, ebp
    0x49,                               // dec ecx
    0x75, 0xED,                         // jnz fill
    0x66, 0xBA, 0x12, 0x00,             // mov dx, PORT_RESULT
    0x89, 0xD8,                         // mov eax, ebx          ; report "fill done"
    0xEF,                               // out dx, eax
    0xEB, 0xC0,                         // jmp loop
    // 0x40 sum: acc = rol(acc, 5) ^ word 0 + last word, over every page
    0x31, 0xC0,                         // xor eax, eax
    // 0x42 sum_loop:
    0xC1, 0xC0, 0x05,                   // rol eax, 5
    0x33, 0x06,                         // xor eax, [esi]
    0x03, 0x86, 0xFC, 0x0F, 0x00, 0x00, // add eax, [esi+0xFFC]
    0x01, 0xEE,                         // add esi, ebp
    0x49,                               // dec ecx
    0x75, 0xF0,                         // jnz sum_loop
    0x66, 0xBA, 0x12, 0x00,             // mov dx, PORT_RESULT
    0xEF,                               // out dx, eax           ; the checksum
    0xEB, 0xA7,                         // jmp loop
];

/// A command for one vCPU. Pages are data page indices: page `p` is at guest physical
/// address [`DATA_GPA`] + `p` × 4 KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Write `seed`-derived values into `pages` pages from `first`, every `stride`th page.
    Fill {
        /// First data page.
        first: u32,
        /// Pages to write (at least 1).
        pages: u32,
        /// The seed mixed into every value.
        seed: u32,
        /// Distance between written pages, in pages (at least 1).
        stride: u32,
    },
    /// Read `pages` consecutive pages from `first` and report their checksum.
    Checksum {
        /// First data page.
        first: u32,
        /// Pages to read (at least 1).
        pages: u32,
    },
    /// Execute `hlt`: the vCPU exits to the VMM at a clean point.
    Halt,
}

impl Command {
    /// The five words the guest reads: command number and its four arguments.
    pub(crate) fn words(self) -> [u32; 5] {
        match self {
            Command::Fill {
                first,
                pages,
                seed,
                stride,
            } => {
                assert!(pages > 0 && stride > 0, "the guest loops 2^32 times on 0");
                [1, page_gpa(first), pages, seed, stride * GUEST_PAGE as u32]
            }
            Command::Checksum { first, pages } => {
                assert!(pages > 0, "the guest loops 2^32 times on 0");
                [2, page_gpa(first), pages, 0, GUEST_PAGE as u32]
            }
            Command::Halt => [0; 5],
        }
    }
}

fn page_gpa(page: u32) -> u32 {
    u32::try_from(DATA_GPA + u64::from(page) * GUEST_PAGE).expect("guest memory below 4 GiB")
}

/// What the guest's memory must hold: the seed last written into each data page (`None`:
/// never written, all zeros), so the expected checksum is known without reading guest
/// memory. Serializable: a migration's device state can carry it beside the vCPUs', for
/// the destination to check the guest against.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GuestModel {
    seeds: Vec<Option<u32>>,
}

impl GuestModel {
    /// A guest of `pages` data pages, none written.
    pub fn new(pages: u32) -> Self {
        Self {
            seeds: vec![None; pages as usize],
        }
    }

    /// Applies a command the guest ran.
    pub fn apply(&mut self, command: Command) {
        if let Command::Fill {
            first,
            pages,
            seed,
            stride,
        } = command
        {
            for i in 0..pages {
                self.seeds[(first + i * stride) as usize] = Some(seed);
            }
        }
    }

    /// The checksum the guest must report for [`Command::Checksum`] over these pages.
    pub fn checksum(&self, first: u32, pages: u32) -> u32 {
        (first..first + pages).fold(0u32, |acc, page| {
            let (head, tail) = match self.seeds[page as usize] {
                Some(seed) => {
                    let head = page_gpa(page) ^ seed;
                    (head, !head)
                }
                None => (0, 0),
            };
            (acc.rotate_left(5) ^ head).wrapping_add(tail)
        })
    }
}
