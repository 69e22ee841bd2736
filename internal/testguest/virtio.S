# A guest without an operating system that writes as fast as its disk
# takes it: the pattern of writer.S, written through a virtio-blk device
# with many requests in flight instead of int 13h one at a time.
#
# SeaBIOS loads the first sector at 0:0x7c00 from the boot drive. It loads
# the next LOAD_SECTORS sectors of the boot drive to 0x7e00 (int 13h,
# AH=42h), enables A20 and switches to 32-bit flat protected mode; no BIOS
# after that. On PCI bus 0 it takes the first legacy (transitional)
# virtio-blk device (1af4:1001, I/O BAR0) whose capacity reaches past
# DONE_LBA: the 1 MiB boot disk, even on virtio, never does. It resets
# the device, negotiates only the flush feature, sets up queue 0 at VRING
# and writes SECTORS sectors from LBA 0 with INFLIGHT requests of
# REQ_BYTES each in flight, polling the used ring (no interrupts). Every
# sector holds its LBA (8 bytes, little-endian) followed by 0xAB bytes.
# Then it writes the done marker at DONE_LBA ("TGDONE!!", the number of
# sectors written as 8 bytes little-endian, then 0xAB bytes), flushes if
# the device offers it, prints "DONE" on COM1 and halts. It prints
# "WRITING" on COM1 just before its first write, for the rate's timing. Any failure
# prints "ERR" and what failed (a request's virtio status in hex) and
# halts.
#
# SECTORS, DONE_LBA, INFLIGHT, REQ_BYTES (a multiple of 512) and
# LOAD_SECTORS come from the assembler's --defsym; testguest.go
# assembles and links it like writer.S.

	.code16
	.text
	.globl _start

	.equ COM1, 0x3f8
	.equ VRING, 0x10000            # queue 0: page-aligned, at most 28 KiB
	.equ HDRS, 0x18000             # request headers, 16 bytes a slot
	.equ STATUS, 0x19000           # request status bytes, one a slot
	.equ SLOT_LBA, 0x19800         # each slot's first LBA, 4 bytes a slot
	.equ BUFS, 0x200000            # request buffers, REQ_BYTES a slot
	.equ REQ_SECTORS, REQ_BYTES/512

	# virtio legacy PCI I/O registers
	.equ VP_HOST_FEATURES, 0x00
	.equ VP_GUEST_FEATURES, 0x04
	.equ VP_QUEUE_PFN, 0x08
	.equ VP_QUEUE_NUM, 0x0c
	.equ VP_QUEUE_SEL, 0x0e
	.equ VP_QUEUE_NOTIFY, 0x10
	.equ VP_STATUS, 0x12
	.equ VP_CONFIG, 0x14           # device config without MSI-X
	.equ F_FLUSH, 1<<9             # VIRTIO_BLK_F_FLUSH
	.equ T_OUT, 1
	.equ T_FLUSH, 4

_start:
	cli
	xorw %ax, %ax
	movw %ax, %ds
	movw %ax, %es
	movw %ax, %ss
	movw $0x7c00, %sp
	ljmp $0, $start                # some BIOSes jump to 0x7c0:0
start:
	sti
	cld
	movw $load_dap, %si            # DL is still the boot drive
	movb $0x42, %ah
	int $0x13
	jc load_failed

	inb $0x92, %al                 # fast A20
	orb $2, %al
	andb $0xfe, %al
	outb %al, $0x92
	cli
	lgdt gdt_desc
	movl %cr0, %eax
	orl $1, %eax
	movl %eax, %cr0
	ljmpl $0x08, $pm32

load_failed:
	movw $load_msg, %si
1:	lodsb
	testb %al, %al
	jz 2f
	movw $COM1, %dx
	outb %al, %dx
	jmp 1b
2:	hlt
	jmp 2b

	.balign 8
gdt:
	.quad 0
	.quad 0x00cf9a000000ffff       # 0x08: code, flat 4 GiB
	.quad 0x00cf92000000ffff       # 0x10: data, flat 4 GiB
gdt_desc:
	.word gdt_desc - gdt - 1
	.long gdt
load_dap:
	.byte 16, 0
	.word LOAD_SECTORS
	.word 0x7e00, 0
	.long 1, 0
load_msg: .asciz "ERR loading the boot disk\n"

	.org 510
	.word 0xaa55

# Loaded from the boot disk's second sector on.
	.code32
pm32:
	movw $0x10, %ax
	movw %ax, %ds
	movw %ax, %es
	movw %ax, %ss
	movw %ax, %fs
	movw %ax, %gs
	movl $0x7c00, %esp

	# The data disk: bus 0, every device and function.
	xorl %ebx, %ebx                # bus<<16 | device<<11 | function<<8
scan:
	movl %ebx, %eax
	call pci_read
	cmpl $0x10011af4, %eax
	jne scan_next
	leal 0x10(%ebx), %eax          # BAR0
	call pci_read
	testl $1, %eax
	jz scan_next                   # not I/O: not the legacy interface
	andl $0xfffc, %eax
	movl %eax, iobase
	leal VP_CONFIG+4(%eax), %edx   # capacity, high half
	inl %dx, %eax
	testl %eax, %eax
	jnz found
	subl $4, %edx
	inl %dx, %eax
	cmpl $DONE_LBA, %eax
	ja found
scan_next:
	addl $0x100, %ebx
	cmpl $0x10000, %ebx
	jb scan
	movl $nodisk_msg, %esi
	jmp fail

found:
	leal 4(%ebx), %eax             # command: I/O space and bus master on
	call pci_read
	orl $5, %eax
	movl %eax, %ecx
	leal 4(%ebx), %eax
	call pci_write

	movb $0, %al                   # reset
	call set_status
	movb $1, %al                   # ACKNOWLEDGE
	call set_status
	movb $3, %al                   # DRIVER
	call set_status
	movl iobase, %edx
	addl $VP_HOST_FEATURES, %edx
	inl %dx, %eax
	andl $F_FLUSH, %eax
	movl %eax, features
	movl iobase, %edx
	addl $VP_GUEST_FEATURES, %edx
	outl %eax, %dx

	movl iobase, %edx
	addl $VP_QUEUE_SEL, %edx
	xorl %eax, %eax
	outw %ax, %dx
	movl iobase, %edx
	addl $VP_QUEUE_NUM, %edx
	inw %dx, %ax
	movzwl %ax, %eax
	cmpl $3*INFLIGHT, %eax         # three descriptors a request
	jb small_queue
	cmpl $1024, %eax
	ja small_queue                 # no room at VRING for more
	leal -1(%eax), %ecx
	movl %ecx, qmask
	shll $4, %eax                  # the descriptors: 16 bytes each
	leal VRING(%eax), %ecx
	movl %ecx, avail
	shrl $3, %eax                  # avail: 2 bytes an entry, 6 more
	leal 6+4095(%ecx,%eax), %ecx   # used: at the next page
	andl $~4095, %ecx
	movl %ecx, used

	movl $VRING, %edi              # queue, headers, status bytes: zero
	movl $(STATUS+4096-VRING)/4, %ecx
	xorl %eax, %eax
	rep stosl
	movl $BUFS, %edi               # the buffers: 0xAB, only LBAs change
	movl $INFLIGHT*REQ_BYTES/4, %ecx
	movl $0xabababab, %eax
	rep stosl
	# Every slot's buffer holds LBAs 0.. (slot_lba 0): a request adds the
	# distance to its own first LBA, one instruction a sector, as a
	# hypervisor that emulates every instruction (PVM with a guest
	# without paging) makes each count.
	movl $BUFS, %edi
	movl $INFLIGHT, %edx
1:	xorl %eax, %eax
2:	movl %eax, (%edi)
	movl $0, 4(%edi)
	incl %eax
	addl $512, %edi
	cmpl $REQ_SECTORS, %eax
	jb 2b
	decl %edx
	jnz 1b

	# Slot i: descriptors 3i (header), 3i+1 (data), 3i+2 (status).
	xorl %esi, %esi
1:	leal (%esi,%esi,2), %ebx
	shll $4, %ebx
	addl $VRING, %ebx              # descriptor 3i
	movl %esi, %eax
	shll $4, %eax
	addl $HDRS, %eax
	movl %eax, (%ebx)
	movl $16, 8(%ebx)
	movw $1, 12(%ebx)              # NEXT
	leal (%esi,%esi,2), %eax
	incl %eax
	movw %ax, 14(%ebx)
	imull $REQ_BYTES, %esi, %ecx
	addl $BUFS, %ecx
	movl %ecx, 16(%ebx)
	movw $1, 28(%ebx)              # NEXT (the device reads the data)
	incl %eax
	movw %ax, 30(%ebx)
	leal STATUS(%esi), %ecx
	movl %ecx, 32(%ebx)
	movl $1, 40(%ebx)
	movw $2, 44(%ebx)              # WRITE
	incl %esi
	cmpl $INFLIGHT, %esi
	jb 1b

	movl iobase, %edx
	addl $VP_QUEUE_PFN, %edx
	movl $VRING>>12, %eax
	outl %eax, %dx
	movb $7, %al                   # DRIVER_OK
	call set_status

	movl $start_msg, %esi
	call puts
	# Fill every slot, then refill each slot the device is done with.
	xorl %esi, %esi
fill:
	cmpl $0, remaining
	je drain
	cmpl $INFLIGHT, %esi
	jae drain
	call submit
	incl %esi
	jmp fill
drain:
	cmpl $0, inflight
	je data_done
	call reap
	cmpl $0, remaining
	je drain
	call submit
	jmp drain

data_done:
	# The done marker from slot 0's first sector.
	movl $BUFS, %edi
	movl $0x4f444754, (%edi)       # "TGDO"
	movl $0x2121454e, 4(%edi)      # "NE!!"
	movl lba, %eax
	movl %eax, 8(%edi)
	movl $0, 12(%edi)              # the rest of the sector is still 0xAB
	movl $HDRS, %edi
	movl $T_OUT, (%edi)
	movl $DONE_LBA, 8(%edi)
	movl $0, 12(%edi)
	movl $512, VRING+16+8
	movb $0xff, STATUS
	xorl %eax, %eax
	call post
	call reap

	cmpl $0, features
	je 1f
	movl $T_FLUSH, HDRS            # header straight to the status byte
	movl $0, HDRS+8
	movw $2, VRING+14
	movb $0xff, STATUS
	xorl %eax, %eax
	call post
	call reap
1:	movl $done_msg, %esi
	call puts
	jmp halt

small_queue:
	movl $queue_msg, %esi
fail:
	call puts
halt:
	cli
	hlt
	jmp halt

# submit: the next request of the data in slot ESI.
submit:
	pushl %esi
	movl remaining, %ecx
	cmpl $REQ_SECTORS, %ecx
	jbe 1f
	movl $REQ_SECTORS, %ecx
1:	subl %ecx, remaining
	imull $REQ_BYTES, %esi, %edi
	addl $BUFS, %edi
	movl lba, %eax                 # the slot's sectors hold the LBAs
	movl %eax, %ebx                # from slot_lba on: move them here
	xchgl %eax, SLOT_LBA(,%esi,4)
	subl %eax, %ebx
	movl %ecx, %edx
2:	cmpl $16, %edx
	jb 3f
	.irp k, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15
	addl %ebx, \k*512(%edi)
	.endr
	addl $16*512, %edi
	subl $16, %edx
	jmp 2b
3:	testl %edx, %edx
	jz 4f
	addl %ebx, (%edi)
	addl $512, %edi
	decl %edx
	jmp 3b
4:
	movl %esi, %edi
	shll $4, %edi
	addl $HDRS, %edi
	movl $T_OUT, (%edi)
	movl lba, %eax
	movl %eax, 8(%edi)
	movl $0, 12(%edi)
	addl %ecx, lba
	shll $9, %ecx
	leal (%esi,%esi,2), %eax       # the head, 3i
	movl %eax, %edx
	shll $4, %edx
	movl %ecx, VRING+16+8(%edx)    # descriptor 3i+1's length
	movb $0xff, STATUS(%esi)
	call post
	incl inflight
	popl %esi
	ret

# post: the request whose head descriptor is EAX to the device.
post:
	movl avail, %ebx
	movzwl avail_idx, %ecx
	andl qmask, %ecx
	movw %ax, 4(%ebx,%ecx,2)
	incw avail_idx
	movw avail_idx, %cx
	movw %cx, 2(%ebx)              # x86 keeps stores in order: entry first
	movl iobase, %edx
	addl $VP_QUEUE_NOTIFY, %edx
	xorl %eax, %eax
	outw %ax, %dx
	ret

# reap: waits for the device to finish a request, checks its status and
# returns its slot in ESI.
reap:
	movl used, %ebx
1:	movw 2(%ebx), %ax
	cmpw used_idx, %ax
	jne 2f
	pause
	jmp 1b
2:	movzwl used_idx, %ecx
	andl qmask, %ecx
	movl 4(%ebx,%ecx,8), %eax      # the head of the request done
	incw used_idx
	xorl %edx, %edx
	movl $3, %ecx
	divl %ecx
	movl %eax, %esi
	movb STATUS(%esi), %bl
	testb %bl, %bl
	jnz failed
	decl inflight
	ret

failed:
	movl $err_msg, %esi
	call puts
	movb %bl, %al
	shrb $4, %al
	call puthex
	movb %bl, %al
	call puthex
	movb $'\n', %al
	call putc
	jmp halt

# set_status: AL to the device status register.
set_status:
	movl iobase, %edx
	addl $VP_STATUS, %edx
	outb %al, %dx
	ret

# pci_read: the config dword at EAX (bus, device, function, register).
pci_read:
	orl $0x80000000, %eax
	movw $0xcf8, %dx
	outl %eax, %dx
	movw $0xcfc, %dx
	inl %dx, %eax
	ret

# pci_write: ECX to the config dword at EAX.
pci_write:
	orl $0x80000000, %eax
	movw $0xcf8, %dx
	outl %eax, %dx
	movw $0xcfc, %dx
	movl %ecx, %eax
	outl %eax, %dx
	ret

	.include "serial.inc"

start_msg:  .asciz "WRITING\n"
done_msg:   .asciz "DONE\n"
err_msg:    .asciz "ERR "
nodisk_msg: .asciz "ERR no virtio-blk disk past DONE_LBA on PCI bus 0\n"
queue_msg:  .asciz "ERR virtio queue 0 too small or too large for INFLIGHT\n"

	.balign 4
remaining: .long SECTORS
lba:       .long 0
inflight:  .long 0
iobase:    .long 0
features:  .long 0
qmask:     .long 0
avail:     .long 0
used:      .long 0
avail_idx: .word 0
used_idx:  .word 0
