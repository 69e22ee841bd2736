# A guest without an operating system: a 512-byte boot sector that writes
# a known pattern over the second BIOS disk and says so on COM1.
#
# SeaBIOS loads it at 0:0x7c00 from drive 0x80. It checks the int 13h
# extensions on drive 0x81 (AH=41h), then writes SECTORS sectors from
# LBA 0 with extended writes (AH=43h, a Disk Address Packet, PER_CALL
# sectors a call); every sector holds its LBA (8 bytes, little-endian)
# followed by 0xAB bytes. Then it writes the done marker at DONE_LBA
# ("TGDONE!!", the number of sectors written as 8 bytes little-endian,
# then 0xAB bytes), prints "DONE" on COM1 and halts. A '.' on COM1 marks
# every 16 MiB; a failed call prints "ERR" and the BIOS status (AH) in
# hex, then halts.
#
# SECTORS, PER_CALL (at most 127) and DONE_LBA come from the assembler's
# --defsym; build.go assembles and links it:
#   as --32 -I DIR --defsym SECTORS=... -o writer.o writer.S   (DIR holds serial.inc)
#   ld -m elf_i386 -Ttext 0x7c00 --oformat binary -o writer.bin writer.o

	.code16
	.text
	.globl _start

	.equ DATA_DRIVE, 0x81
	.equ BUF_SEG, 0x1000          # the write buffer: 0x1000:0, 64 KiB at most
	.equ COM1, 0x3f8

_start:
	cli
	xorw %ax, %ax
	movw %ax, %ds
	movw %ax, %ss
	movw $0x7c00, %sp
	ljmp $0, $start                # some BIOSes jump to 0x7c0:0
start:
	sti
	cld

	# The extensions, with the extended disk access functions (CX bit 0).
	movb $0x41, %ah
	movw $0x55aa, %bx
	movb $DATA_DRIVE, %dl
	int $0x13
	jc no_ext
	cmpw $0xaa55, %bx
	jne no_ext
	testw $1, %cx
	jz no_ext

	# Fill the buffer with 0xAB once; only the LBAs change.
	movw $BUF_SEG, %ax
	movw %ax, %es
	xorw %di, %di
	movw $PER_CALL*512, %cx
	movb $0xab, %al
	rep stosb

next:
	movl remaining, %eax
	testl %eax, %eax
	jz finished
	movl $PER_CALL, %ecx
	cmpl %ecx, %eax
	jae 1f
	movl %eax, %ecx
1:	movw %cx, count

	# Stamp each sector of this call with its LBA.
	movl lba, %eax
	xorw %di, %di
2:	movl %eax, %es:(%di)
	movl $0, %es:4(%di)
	incl %eax
	addw $512, %di
	loop 2b

	movl lba, %eax
	movw count, %cx
	call write
	movzwl count, %eax
	addl %eax, lba
	subl %eax, remaining
	testl $0x7fff, lba             # 16 MiB of 512-byte sectors
	jnz next
	movb $'.', %al
	call putc
	jmp next

finished:
	xorw %di, %di
	movl $0x4f444754, %es:(%di)    # "TGDO"
	movl $0x2121454e, %es:4(%di)   # "NE!!"
	movl lba, %eax
	movl %eax, %es:8(%di)
	movl $0, %es:12(%di)
	movl $DONE_LBA, %eax
	movw $1, %cx
	call write
	movw $done_msg, %si
	call puts
	jmp halt

no_ext:
	movw $noext_msg, %si
	call puts
	jmp halt

# write: CX sectors from the buffer to LBA EAX of the data drive.
write:
	movw %cx, dap_count
	movl %eax, dap_lba
	movw $dap, %si
	movw $0x4300, %ax              # AL=0: no verify
	movb $DATA_DRIVE, %dl
	int $0x13
	jc failed
	ret

failed:
	movb %ah, %bl
	movw $err_msg, %si
	call puts
	movb %bl, %al
	shrb $4, %al
	call puthex
	movb %bl, %al
	call puthex
	movb $'\n', %al
	call putc
halt:
	cli
	hlt
	jmp halt

	.include "serial.inc"

done_msg:  .asciz "DONE\n"
noext_msg: .asciz "NOEXT\n"
err_msg:   .asciz "ERR "

	.balign 4
remaining: .long SECTORS
lba:       .long 0
count:     .word 0
dap:       .byte 16, 0
dap_count: .word 0
dap_buf:   .word 0, BUF_SEG
dap_lba:   .long 0, 0

	.org 510
	.word 0xaa55
