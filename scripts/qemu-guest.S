/* The guest scripts/qemu-compare migrates: a Multiboot (v1) image that QEMU's -kernel loads
 * in 32-bit protected mode with flat segments. It increments one byte in every 4 KiB page
 * from 2 MiB up to TOP (the guest's memory size, given with --defsym), then starts over,
 * forever: every page is written, again and again, as fast as the CPU goes. */
        .text
        .align 4
        .long 0x1BADB002                /* Multiboot magic */
        .long 0                         /* flags: none (the ELF headers say where to load) */
        .long -0x1BADB002               /* checksum: magic + flags + checksum = 0 */

        .globl _start
        .code32
_start:
        cli
1:      mov $0x200000, %edi
2:      incb (%edi)
        add $4096, %edi
        cmp $TOP, %edi
        jb 2b
        jmp 1b
